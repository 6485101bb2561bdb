"""Latency on the machine at hand: every deployment graph, several batch sizes, p50/p90/p99.

Warm-up runs first, then timed runs: CUDA events on a GPU (host timers would measure the launch,
not the kernels), ``perf_counter`` on the CPU. This module holds the timing and the ``Timing`` rows;
the deployment graphs are defined with the exporters, so ``upop.exporters.timing`` times them
(in PyTorch, ONNX Runtime and TensorRT) with these pieces.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

SEQ = 32
#: dynamic axes that count items (the rest of the named axes count tokens: sequence, answer, past, total)
BATCH_AXES = ("batch", "images", "texts")


#: token axes of a decode step that span the past and the new token: ``seq`` past positions make ``seq + 1``
GROWN_AXES = ("total",)
#: the token axis of a decode step's cache: a graph that reads one decodes one token per item a run
PAST_AXIS = "past"


def is_batch_axis(dim: Any) -> bool:
    return dim in BATCH_AXES


def token_length(dim: str, seq: int) -> int:
    """The length a token axis takes when the prompt (or the past) is ``seq`` tokens."""
    return seq + 1 if dim in GROWN_AXES else seq


def feed_shape(dims: Sequence[Any], batch: int, seq: int = SEQ) -> list[int]:
    """A concrete shape for an exported input: item axes take ``batch``, token axes ``seq`` (a decode step's
    mask over past and new token ``seq + 1``), fixed sizes stay."""
    return [batch if is_batch_axis(d) else (token_length(d, seq) if isinstance(d, str) else int(d)) for d in dims]


def token_axes(inputs: Sequence[dict[str, Any]], seq: int = SEQ) -> tuple[str, bool]:
    """What a graph's token axes were at ``seq`` (``"sequence 32"``, ``"past 32"``) and whether it is a decode step
    (it reads a cache along ``PAST_AXIS``: one new token per item and run), from its inputs' shapes."""
    names = sorted({d for i in inputs for d in i.get("shape", []) if isinstance(d, str) and not is_batch_axis(d)})
    return ", ".join(f"{n} {seq}" for n in names if n not in GROWN_AXES), PAST_AXIS in names


@dataclass
class Timing:
    target: str
    runtime: str
    device: str
    precision: str
    graph: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # items per second at p50
    provider: str = ""
    tokens: str = ""  # the token axes' lengths it ran at ("sequence 32", "past 32")
    tokens_per_s: float | None = None  # a decode step's new tokens per second (one per item and run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def time_fn(fn: Callable[[], Any], warmup: int, runs: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return out


def make_run(target: str, runtime: str, device: str, precision: str, graph: str, batch: int, ms: list[float],
             provider: str = "", inputs: Sequence[dict[str, Any]] | None = None, seq: int = SEQ) -> Timing:
    """A row; ``inputs`` (the graph's inputs, each with its ``shape``) adds the token lengths it ran at, and a
    decode step's tokens per second."""
    p50 = percentile(ms, 0.5)
    per_s = 1000.0 * batch / p50 if p50 > 0 else 0.0
    tokens, step = token_axes(inputs or [], seq)
    return Timing(target, runtime, device, precision, graph, batch, p50, percentile(ms, 0.9), percentile(ms, 0.99),
                  per_s, provider, tokens, per_s if step else None)


def totals(runs: Sequence[Timing]) -> dict[int, float]:
    """p50 of the whole pipeline (all graphs in sequence) per batch size."""
    out: dict[int, float] = {}
    for r in runs:
        out[r.batch] = out.get(r.batch, 0.0) + r.p50_ms
    return out


def speedup(baseline: Sequence[Timing], candidate: Sequence[Timing]) -> float:
    """Geometric mean over batch sizes of baseline / candidate pipeline p50."""
    a, b = totals(baseline), totals(candidate)
    ratios = [a[k] / b[k] for k in a if k in b and b[k] > 0]
    return float(statistics.geometric_mean(ratios)) if ratios else float("nan")
