"""Measured latency of the model before and after compression, for every run's report.

The original is timed before the search and the slim model after the retrain, on the run's device,
at batch 1 and at the training batch: warm-up runs, then enough timed runs to fill a small time
budget (CUDA events on a GPU). PyTorch is always measured; other runtimes (ONNX Runtime on the
exported graph) are handed in as ``Runtime`` objects by the caller, since the core does not import the exporters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .timing import percentile, time_fn, token_axes

@dataclass(frozen=True)
class Runtime:
    """How to run a model in one runtime: ``prepare(model, inputs)`` does the one-off work (an export, a
    session) and returns a call that runs one forward; ``cuda_events``: time it with CUDA events."""

    prepare: Callable[[nn.Module, dict[str, torch.Tensor]], Callable[[], Any]]
    cuda_events: bool = False


TEXT_TOKENS = 32
#: key of a runtime's per-stage timings (a deployment that decodes with a cache), beside its batch sizes
STAGES = "stages"
WARMUP = 2
RUNS = (5, 50)  # at least, at most
BUDGET_S = 0.5  # timed seconds per model, batch and runtime (the test suite lowers it)


def torch_runtime(device: torch.device) -> Runtime:
    def prepare(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return model(**inputs)

        return run

    return Runtime(prepare, cuda_events=device.type == "cuda")


def _runs_for(one_ms: float) -> int:
    """As many runs as fit the budget, within ``RUNS``: stable percentiles without a long wait on a big model."""
    return int(min(RUNS[1], max(RUNS[0], BUDGET_S * 1000 / max(one_ms, 1e-3))))


def _time(run: Callable[[], Any], runtime: Runtime) -> dict[str, Any]:
    probe = time_fn(run, WARMUP, 1, runtime.cuda_events)
    ms = time_fn(run, 0, _runs_for(probe[0]), runtime.cuda_events)
    where = getattr(run, "device", None)
    return {"p50_ms": percentile(ms, 0.5), "p90_ms": percentile(ms, 0.9), "runs": float(len(ms)),
            **({"device": where} if where is not None else {})}


def time_model(model: nn.Module, adapter: Any, batch: int, device: torch.device, runtime: Runtime) -> dict[str, Any]:
    """p50 and p90 (ms) of one forward of ``model`` on a batch of the adapter's example inputs, and ``device``
    where the runtime's call says where it ran (a runtime may fall back to the CPU)."""
    was_training = model.training
    model.eval()
    inputs = adapter.example_inputs(model, batch_size=batch, seq_len=TEXT_TOKENS,
                                    generator=torch.Generator().manual_seed(0))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = _time(runtime.prepare(model, inputs), runtime)
    model.train(was_training)
    return out


class _Named(nn.Module):
    """A deployment graph's wrapper called with its named inputs, as the runtimes call a model."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.graph = module

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.graph(*inputs.values())


def staged_graphs(model: nn.Module, adapter: Any) -> list[Any]:
    """The model's deployment graphs that name a stage (``upop.adapters.graphs.ExportGraph.stage``): those of a
    deployment that decodes with a cache; none for a model whose deployment is one forward."""
    from ..adapters.graphs import graphs_of

    fn = graphs_of(type(model).__name__)
    return [g for g in fn(model, adapter) if g.stage] if fn is not None else []


def time_stages(model: nn.Module, adapter: Any, device: torch.device, runtime: Runtime) -> dict[str, dict[str, Any]]:
    """Per staged graph, at batch 1 with ``TEXT_TOKENS`` prompt (or past) tokens: its stage, token lengths, p50/p90 ms,
    and for a decode step its tokens per second."""
    was_training = model.training
    model.eval()
    out = {}
    for g in staged_graphs(model, adapter):
        torch.manual_seed(0)
        inputs = {k: v.to(device) for k, v in g.make_inputs(1, TEXT_TOKENS).items()}
        tokens, step = token_axes([{"shape": list(axes.values())} for axes in g.dynamic.values()], TEXT_TOKENS)
        timed = _time(runtime.prepare(_Named(g.module), inputs), runtime)
        per_s = {"tokens_per_s": 1000.0 / timed["p50_ms"]} if step and timed["p50_ms"] > 0 else {}
        out[g.name] = {"stage": g.stage, "tokens": tokens, **timed, **per_s}
    model.train(was_training)
    return out


def measure(model: nn.Module, adapter: Any, batches: Sequence[int], device: torch.device,
            runtimes: Mapping[str, Runtime]) -> dict[str, dict[Any, dict[str, Any]]]:
    """``{runtime: {batch: {p50_ms, p90_ms, runs}}}`` for every runtime and batch size, and under ``STAGES`` the
    staged graphs' timings where the model's deployment has some."""
    out: dict[str, dict[Any, dict[str, Any]]] = {}
    staged = bool(staged_graphs(model, adapter))
    for name, rt in runtimes.items():
        try:
            out[name] = _measure_one(model, adapter, batches, device, rt, staged)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run the model loses its rows, not the run
            from ..run.safety import say_once

            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            say_once(f"latency in {name} not measured ({type(exc).__name__}: {first}); the report has no {name} rows")
    return out


def _measure_one(model: nn.Module, adapter: Any, batches: Sequence[int], device: torch.device, rt: Runtime,
                 staged: bool) -> dict[Any, dict[str, Any]]:
    """One runtime's timings: a deployment that decodes with a cache is timed by its stages (image encode, prefill,
    a decode step), since one forward of the whole model is not how it runs; any other model at each batch."""
    if staged:
        return {STAGES: time_stages(model, adapter, device, rt)}
    return {b: time_model(model, adapter, b, device, rt) for b in batches}


def latency_rows(before: dict[str, Any], after: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """The report's rows: one per runtime and batch measured both before and after, then one per staged graph."""
    rows = []
    for runtime, per_batch in after.items():
        for batch, a in per_batch.items():
            b = before.get(runtime, {}).get(batch)
            if b is None or batch == STAGES:
                continue
            rows.append({"runtime": runtime, "device": a.get("device", str(device)), "batch": int(batch),
                         **_compared(b, a)})
        for graph, a in per_batch.get(STAGES, {}).items():
            b = before.get(runtime, {}).get(STAGES, {}).get(graph)
            if b is not None:
                per_s = ({"before_tokens_per_s": b["tokens_per_s"], "after_tokens_per_s": a["tokens_per_s"]}
                         if "tokens_per_s" in a and "tokens_per_s" in b else {})
                rows.append({"runtime": runtime, "device": a.get("device", str(device)), "batch": 1, "graph": graph,
                             "stage": a["stage"], "tokens": a["tokens"], **_compared(b, a), **per_s})
    return rows


def _compared(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
    return {"before_ms": b["p50_ms"], "after_ms": a["p50_ms"], "before_p90_ms": b["p90_ms"], "after_p90_ms": a["p90_ms"],
            "speedup": b["p50_ms"] / a["p50_ms"] if a["p50_ms"] > 0 else 0.0}
