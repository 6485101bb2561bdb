"""Calibrate a hardware profile on this machine: measured block latencies instead of a roofline.

For every distinct compressible block of a model (kind, input widths, heads, token counts at the
profile's reference shapes), an equivalent stand-alone block (the same Linears and attention, random
weights) is timed across a sweep of kept widths. The rest of the model (embeddings, norms, heads),
which slimming does not change, is the full model's measured forward minus the blocks' sum. The
result is a profile whose latency model is that table: a unit costs the measured slope of its
block, and a model's predicted latency is its blocks' interpolated times plus the rest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .latency import ort_session, percentile, time_fn
from .units import AttentionSpec, ModuleSpec


class _Attention(nn.Module):
    def __init__(self, d_q: int, d_kv: int, d_out: int, heads: int, head_dim: int, scale: float):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, scale
        self.q, self.o = nn.Linear(d_q, heads * head_dim), nn.Linear(heads * head_dim, d_out)
        self.k, self.v = nn.Linear(d_kv, heads * head_dim), nn.Linear(d_kv, heads * head_dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, d_in: int, width: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, width), nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # kv unused: same signature as _Attention
        return self.fc2(F.gelu(self.fc1(x)))


def signature(model: nn.Module, adapter: Any, spec: ModuleSpec, granularity: str, text_tokens: int) -> dict[str, Any]:
    """What a block's latency depends on, besides its kept width."""
    tq, tkv = adapter.module_tokens(model, spec, text_tokens)
    if isinstance(spec, AttentionSpec):
        first = model.get_submodule(spec.in_projs[0].name)
        last = model.get_submodule(spec.in_projs[-1].name)
        return {"kind": "attn", "granularity": granularity, "d_q": first.in_features, "d_kv": last.in_features,
                "d_out": model.get_submodule(spec.out_proj).out_features, "heads": spec.num_heads,
                "head_dim": spec.head_dim, "tq": tq, "tkv": tkv}
    fc1, fc2 = model.get_submodule(spec.fc1), model.get_submodule(spec.fc2)
    return {"kind": "mlp", "d_in": fc1.in_features, "d_out": fc2.out_features, "tq": tq, "tkv": tq}


def _block(sig: dict[str, Any], width: int) -> nn.Module:
    if sig["kind"] == "mlp":
        return _MLP(sig["d_in"], width, sig["d_out"])
    heads, hd = (sig["heads"], width) if sig["granularity"] == "dim" else (width, sig["head_dim"])
    return _Attention(sig["d_q"], sig["d_kv"], sig["d_out"], heads, hd, sig["head_dim"] ** -0.5)


def _sweep(full: int, points: int) -> list[int]:
    ws = sorted({max(1, round(full * i / points)) for i in range(1, points + 1)} | {full})
    return ws


def time_block(sig: dict[str, Any], width: int, batch: int, device: torch.device, warmup: int, runs: int,
               runtime: str = "torch", fp16: bool = False) -> float:
    block = _block(sig, width).to(device).eval()
    x = torch.randn(batch, sig["tq"], sig["d_q"] if sig["kind"] == "attn" else sig["d_in"], device=device)
    kv = torch.randn(batch, sig["tkv"], sig["d_kv"], device=device) if sig["kind"] == "attn" else x
    if runtime == "ort":
        return ort_time(block, {"x": x, "kv": kv}, device, warmup, runs)
    if runtime == "trt":
        return trt_time(block, {"x": x, "kv": kv}, warmup, runs, fp16=fp16)
    with torch.inference_mode():
        return percentile(time_fn(lambda: block(x, kv), warmup, runs, device.type == "cuda"), 0.5)


class _Positional(nn.Module):
    """Calls a module with keyword inputs given positionally (what the ONNX exporter passes)."""

    def __init__(self, module: nn.Module, names: Sequence[str], pick: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.module, self.names, self.pick = module, list(names), pick

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.pick(self.module(**dict(zip(self.names, args))))


def export_static_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], path: str | Path,
                       pick: Callable[[Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``module`` as an ONNX graph for exactly these input shapes (what the ORT and TensorRT block timings
    run); returns the inputs on the CPU, named as the graph's inputs."""
    import warnings

    cpu_inputs = {k: v.detach().cpu() for k, v in inputs.items()}
    wrapper = _Positional(module.cpu().eval(), list(cpu_inputs), pick or (lambda out: out))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(cpu_inputs.values()), str(path), input_names=list(cpu_inputs),
                          opset_version=17, dynamo=False)
    return cpu_inputs


def trt_time(module: nn.Module, inputs: dict[str, torch.Tensor], warmup: int, runs: int, fp16: bool = False,
             pick: Callable[[Any], torch.Tensor] | None = None) -> float:
    """p50 ms of ``module`` as a TensorRT engine built for these exact shapes (untested here: no TensorRT)."""
    from upop.exporters.tensorrt import engine_latency

    return percentile(engine_latency(module, inputs, fp16=fp16, warmup=warmup, runs=runs, pick=pick), 0.5)


def ort_time(module: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device, warmup: int, runs: int,
             pick: Callable[[Any], torch.Tensor] | None = None) -> float:
    """p50 ms of ``module`` exported to ONNX (static shapes) and run in ONNX Runtime."""
    import os
    import tempfile

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "block.onnx")
        cpu_inputs = export_static_onnx(module, inputs, path, pick)
        sess = ort_session(path, providers)
        feed = {i.name: cpu_inputs[i.name].numpy() for i in sess.get_inputs()}
        return percentile(time_fn(lambda: sess.run(None, feed), warmup, runs, cuda=False), 0.5)


def calibrate(model: nn.Module, adapter: Any, base: Any, *, device: torch.device, granularity: str = "dim",
              points: int = 6, warmup: int = 3, runs: int = 15, runtime: str = "torch",
              log: Callable[[str], None] | None = None) -> Any:
    """A copy of profile ``base`` whose latency model is measured here for ``model``'s blocks."""
    batch, text = base.shapes.batch, base.shapes.text_tokens
    if runtime == "trt" and device.type != "cuda":
        from .errors import ConfigError

        raise ConfigError("TensorRT calibration runs on a CUDA device: --device cuda")
    fp16 = base.precision == "fp16"  # TensorRT builds at the profile's precision
    specs = adapter.modules(model)
    blocks: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for s in specs:
        sig = signature(model, adapter, s, granularity, text)
        key = repr(sorted(sig.items()))
        if key in seen:
            continue
        full = s.num_units(granularity)
        widths = _sweep(full, points)
        ms = [time_block(sig, w, batch, device, warmup, runs, runtime, fp16) for w in widths]
        entry = {**sig, "widths": widths, "ms": ms}
        seen[key] = entry
        blocks.append(entry)
        if log:
            log(f"{sig['kind']} {sig.get('d_q', sig.get('d_in'))}→{sig['d_out']} tokens {sig['tq']}: "
                + ", ".join(f"{w}:{m:.3f}" for w, m in zip(widths, ms)))
    table = {"blocks": blocks, "rest_ms": 0.0, "granularity": granularity, "device": str(device),
             "runtime": runtime}
    profile = dataclasses.replace(base, latency_model="table", table=table, name=f"{base.name}-calibrated",
                                  description=f"{base.description}; latency measured on this machine ({device})")
    from .hardware import predicted_latency_ms

    full_ms = measure_forward_ms(model, adapter, batch, text, device, warmup, runs, runtime, fp16)
    blocks_ms = predicted_latency_ms(model, adapter, profile, granularity)
    table["rest_ms"] = max(0.0, full_ms - blocks_ms)
    return profile


def measure_forward_ms(model: nn.Module, adapter: Any, batch: int, text_tokens: int, device: torch.device,
                       warmup: int = 3, runs: int = 15, runtime: str = "torch", fp16: bool = False) -> float:
    """p50 of one forward of the whole model at the reference shapes (what the prediction is checked against)."""
    model = model.to(device).eval()
    inputs = adapter.example_inputs(model, batch_size=batch, seq_len=text_tokens,
                                    generator=torch.Generator().manual_seed(0))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    def first_tensor(out: Any) -> torch.Tensor:
        return next(v for v in out.values() if isinstance(v, torch.Tensor))

    if runtime == "ort":
        return ort_time(model, inputs, device, warmup, runs, pick=first_tensor)
    if runtime == "trt":
        return trt_time(model, inputs, warmup, runs, fp16=fp16, pick=first_tensor)
    with torch.inference_mode():
        return percentile(time_fn(lambda: model(**inputs), warmup, runs, device.type == "cuda"), 0.5)


def interpolate(widths: Sequence[int], ms: Sequence[float], w: float) -> float:
    """Piecewise-linear in the width, extended linearly below the smallest measured width."""
    if w <= widths[0]:
        if len(widths) == 1:
            return ms[0] * w / widths[0]
        slope = (ms[1] - ms[0]) / (widths[1] - widths[0])
        return max(0.0, ms[0] + slope * (w - widths[0]))
    for (w0, m0), (w1, m1) in zip(zip(widths, ms), zip(widths[1:], ms[1:])):
        if w <= w1:
            return m0 + (m1 - m0) * (w - w0) / (w1 - w0)
    return ms[-1]


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
