"""Calibrate a hardware profile on this machine: measured block latencies instead of a roofline.

For every distinct compressible block of a model (unit kind, input widths, heads, token counts at the
profile's reference shapes), its kind's stand-alone block (the same Linears and attention, random
weights) is timed across a sweep of kept widths. The rest of the model (embeddings, norms, heads),
which slimming does not change, is the full model's measured forward minus the blocks' sum. The
result is a profile whose latency model is that table: a unit costs the measured slope of its
block, and a model's predicted latency is its blocks' interpolated times plus the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..pruning.kinds import kind_named
from .timing import percentile, time_fn
from .model import interpolate, predicted_latency_ms, signature
from .measure import Runtime, torch_runtime

__all__ = ["calibrate", "interpolate", "measure_forward_ms", "signature", "time_block", "to_toml"]


def _block(sig: dict[str, Any], width: int) -> nn.Module:
    return kind_named(sig["kind"]).block(sig, width)


def _sweep(full: int, points: int) -> list[int]:
    ws = sorted({max(1, round(full * i / points)) for i in range(1, points + 1)} | {full})
    return ws


#: ``timer(module, inputs, warmup, runs, pick) -> p50 ms``: how a block or a whole model is timed.
#: PyTorch's is here; ONNX Runtime's and TensorRT's come from ``upop.exporters.timing.block_timer``.
BlockTimer = Callable[[nn.Module, dict[str, torch.Tensor], int, int, Callable[[Any], torch.Tensor] | None], float]


def runtime_timer(runtime: Runtime) -> BlockTimer:
    """A calibration timer from a runtime of the latency report (``upop.latency.measure``): the module is prepared
    once (an export, a session) and the p50 of its timed runs returned; the runtime reads its own outputs."""
    def timer(module: nn.Module, inputs: dict[str, torch.Tensor], warmup: int, runs: int,
              pick: Callable[[Any], torch.Tensor] | None = None) -> float:
        return percentile(time_fn(runtime.prepare(module, inputs), warmup, runs, runtime.cuda_events), 0.5)

    return timer


def torch_timer(device: torch.device) -> BlockTimer:
    """p50 ms of the module's forward in PyTorch (CUDA events on a GPU)."""
    return runtime_timer(torch_runtime(device))


def time_block(sig: dict[str, Any], width: int, batch: int, device: torch.device, warmup: int, runs: int,
               timer: BlockTimer | None = None) -> float:
    block = _block(sig, width).to(device).eval()
    batch *= sig.get("items", 1)
    d_x, d_kv = kind_named(sig["kind"]).block_widths(sig)
    x = torch.randn(batch, sig["tq"], d_x, device=device)
    kv = torch.randn(batch, sig["tkv"], d_kv, device=device) if d_kv is not None else x
    return (timer or torch_timer(device))(block, {"x": x, "kv": kv}, warmup, runs, None)


def calibrate(model: nn.Module, adapter: Any, base: Any, *, device: torch.device, granularity: str = "dim",
              points: int = 6, warmup: int = 3, runs: int = 15, runtime: str = "torch", timer: BlockTimer | None = None,
              log: Callable[[str], None] | None = None) -> Any:
    """A copy of profile ``base`` whose latency model is measured here for ``model``'s blocks.

    ``runtime`` names what ``timer`` runs (recorded in the table); a runtime other than torch needs its timer
    (``upop.exporters.timing.block_timer``)."""
    if runtime != "torch" and timer is None:
        raise ConfigError(f"calibrating for runtime {runtime} needs its timer (upop.exporters.timing.block_timer)")
    timer = timer or torch_timer(device)
    batch, text = base.shapes.batch, base.shapes.text_tokens
    blocks: list[dict[str, Any]] = []
    seen: set[str] = set()
    for s in adapter.modules(model):
        sig = signature(model, adapter, s, granularity, text)
        key = repr(sorted(sig.items()))
        if key in seen:
            continue
        seen.add(key)
        widths = _sweep(s.num_units(granularity), points)
        ms = [time_block(sig, w, batch, device, warmup, runs, timer) for w in widths]
        blocks.append({**sig, "widths": widths, "ms": ms})
        if log:
            log(kind_named(sig["kind"]).log_text(sig) + ": " + ", ".join(f"{w}:{m:.3f}" for w, m in zip(widths, ms)))
    table = {"blocks": blocks, "rest_ms": 0.0, "granularity": granularity, "device": str(device),
             "runtime": runtime}
    profile = dataclasses.replace(base, latency_model="table", table=table, name=f"{base.name}-calibrated",
                                  description=f"{base.description}; latency measured on this machine ({device})")
    full_ms = measure_forward_ms(model, adapter, batch, text, device, warmup, runs, timer)
    blocks_ms = predicted_latency_ms(model, adapter, profile, granularity)
    table["rest_ms"] = max(0.0, full_ms - blocks_ms)
    return profile


def measure_forward_ms(model: nn.Module, adapter: Any, batch: int, text_tokens: int, device: torch.device,
                       warmup: int = 3, runs: int = 15, timer: BlockTimer | None = None) -> float:
    """p50 of one forward of the whole model at the reference shapes (what the prediction is checked against)."""
    model = model.to(device).eval()
    inputs = adapter.example_inputs(model, batch_size=batch, seq_len=text_tokens,
                                    generator=torch.Generator().manual_seed(0))
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def first_tensor(out: Any) -> torch.Tensor:
        return next(v for v in out.values() if isinstance(v, torch.Tensor))

    return (timer or torch_timer(device))(model, inputs, warmup, runs, first_tensor)


def to_toml(profile: Any) -> str:
    """The profile as a TOML file (the loader reads it back unchanged)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(float(v)) if isinstance(v, float) else str(v)

    lines = [f"{k} = {val(getattr(profile, k))}" for k in ("name", "description", "runtime", "device", "precision",
                                                              "latency_model", "efficiency")]
    if profile.tensorrt_major is not None:
        lines.append(f"tensorrt_major = {profile.tensorrt_major}")
    for section in ("peaks", "alignment", "shapes"):
        lines += ["", f"[{section}]"]
        for k, v in dataclasses.asdict(getattr(profile, section)).items():
            if v is not None:
                lines.append(f"{k} = {val(v)}")
    t = profile.table
    lines += ["", "[table]", f"rest_ms = {val(float(t['rest_ms']))}", f"granularity = {val(t['granularity'])}",
              f"device = {val(t['device'])}", f"runtime = {val(t.get('runtime', 'torch'))}"]
    for b in t["blocks"]:
        lines += ["", "[[table.blocks]]"] + [f"{k} = {val(v)}" for k, v in b.items()]
    return "\n".join(lines) + "\n"
