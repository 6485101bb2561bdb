"""Timing the deployment graphs: in PyTorch, as ONNX Runtime sessions and as TensorRT engines.

The core holds the timing pieces (``upop.latency.timing``) and measures calibration tables through a timer it is
handed (``upop.latency.calibrate.BlockTimer``); the runtimes it must not import live here, beside the
exporters that make their graphs. ``block_timer`` gives calibration the timer of a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upop.latency.calibrate import BlockTimer, runtime_timer
from upop.errors import ConfigError
from upop.latency.timing import SEQ, Timing, make_run, percentile, time_fn
from upop.latency.measure import Runtime

from .graphs import export_graphs
from .sessions import CPU_EP, CUDA_EP, cuda_device_id, device_in_use, ort_call, ort_session, synthetic_feed
from .static_onnx import export_static_onnx

__all__ = ["block_timer", "ort_runtime", "ort_session", "ort_timer", "profile_ort", "profile_torch", "profile_trt",
           "trt_timer"]


def profile_torch(model: torch.nn.Module, adapter: Any, target: str, batches: Sequence[int], device: torch.device,
                  precision: str = "fp32", warmup: int = 5, runs: int = 30) -> list[Timing]:
    """PyTorch latency of every deployment graph of ``model``, so it compares graph by graph with the runtimes."""
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 latency needs a CUDA device (--device cuda)")
    model = model.eval().to(device)
    if precision == "fp16":
        model = model.half()
    out = []
    for graph in export_graphs(model, adapter):
        for b in batches:
            inputs = {k: v.to(device) for k, v in graph.make_inputs(b, SEQ).items()}
            if precision == "fp16":
                inputs = {k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.inference_mode():
                ms = time_fn(lambda: graph.module(*inputs.values()), warmup, runs, device.type == "cuda")
            axes = [{"name": k, "shape": list(v.values())} for k, v in graph.dynamic.items()]
            out.append(make_run(target, "torch", str(device), precision, graph.name, b, ms, inputs=axes))
    return out


def profile_ort(export_dir: str | Path, target: str, batches: Sequence[int], device: str = "cpu",
                precision: str = "fp32", warmup: int = 5, runs: int = 30, threads: int | None = None) -> list[Timing]:
    import json

    import onnxruntime as ort

    manifest = json.loads((Path(export_dir) / "export.json").read_text())
    wanted = [CUDA_EP, CPU_EP] if device.startswith("cuda") else [CPU_EP]
    gpu = cuda_device_id(device)
    if device.startswith("cuda") and CUDA_EP not in ort.get_available_providers():
        raise ConfigError("ONNX Runtime here has no CUDA provider: install the gpu extra (onnxruntime-gpu)")
    out = []
    for g in manifest["graphs"]:
        if precision == "fp16" and "fp16" not in g:
            raise ConfigError(f"{export_dir} has no FP16 graphs: export with --fp16")
        path = Path(export_dir) / (g["fp16"]["file"] if precision == "fp16" else g["file"])
        sess = ort_session(path, wanted, threads, device_id=gpu)
        provider, used = sess.get_providers()[0], device_in_use(sess, wanted)
        for b in batches:
            ms = time_fn(ort_call(sess, synthetic_feed(g, sess, b), gpu), warmup, runs, cuda=False)
            out.append(make_run(target, "onnxruntime", device if used == "cuda" else "cpu", precision, g["name"], b, ms,
                                provider, inputs=g.get("inputs")))
    return out


def profile_trt(target: str, batches: Sequence[int], device: str = "cuda", precision: str = "fp32", warmup: int = 5,
                runs: int = 30, seq: int = SEQ) -> list[Timing]:
    """TensorRT latency of a ``upop export --format tensorrt`` folder, or of a model whose engines are built
    first (in a temporary folder, at ``precision``, for the asked batch sizes). Untested here: no TensorRT."""
    import tempfile

    from .tensorrt import export_trt, profile_engines, require_tensorrt

    require_tensorrt()
    if not device.startswith("cuda"):
        raise ConfigError("TensorRT runs on a CUDA device: --device cuda")
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")

    def rows(folder: str | Path) -> list[Timing]:
        return [make_run(target, "tensorrt", device, precision, r["graph"], r["batch"], r["ms"], "TensorRT")
                for r in profile_engines(folder, list(batches), seq, warmup, runs)]

    if (Path(target) / "engines.json").is_file():
        return rows(target)
    lo, hi = min(batches), max(batches)
    with tempfile.TemporaryDirectory() as tmp:
        export_trt(target, Path(tmp) / "trt", fp16=precision == "fp16", batch=f"{lo}:{hi}:{hi}",
                   seq=f"1:{seq}:{max(seq, 64)}")
        return rows(Path(tmp) / "trt")


def ort_timer(device: torch.device) -> BlockTimer:
    """p50 ms of a module exported to ONNX (static shapes) and run in ONNX Runtime: the report's ORT runtime."""
    return runtime_timer(ort_runtime(device))


def trt_timer(fp16: bool) -> BlockTimer:
    """p50 ms of a module as a TensorRT engine built for these exact shapes (untested here: no TensorRT)."""
    def timer(module: nn.Module, inputs: dict[str, torch.Tensor], warmup: int, runs: int,
              pick: Callable[[Any], torch.Tensor] | None = None) -> float:
        from .tensorrt import engine_latency

        return percentile(engine_latency(module, inputs, fp16=fp16, warmup=warmup, runs=runs, pick=pick), 0.5)

    return timer


def block_timer(runtime: str, device: torch.device, precision: str = "fp32") -> BlockTimer:
    """The timer calibration uses for ``runtime`` (TensorRT builds at the profile's ``precision``)."""
    from . import backend

    return backend(runtime).block_timer(device, precision)


def ort_runtime(device: torch.device) -> Runtime:
    """The compress report's ONNX Runtime measurement: the model's forward exported to ONNX at the inputs'
    shapes (once per model and batch) and run in ONNX Runtime (its CUDA provider on a GPU when installed)."""
    import os
    import tempfile

    import onnxruntime as ort

    cuda = device.type == "cuda" and CUDA_EP in ort.get_available_providers()
    providers = [CUDA_EP, CPU_EP] if cuda else [CPU_EP]

    def first_tensor(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):  # a block's output
            return out
        return next(v for v in (out.values() if hasattr(out, "values") else out) if isinstance(v, torch.Tensor))

    def prepare(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
        # The GPU of the inputs (this rank's), not whichever the device names.
        where = next(iter(inputs.values())).device if inputs else device
        gpu = cuda_device_id(where)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            cpu_inputs = export_static_onnx(model, inputs, path, first_tensor)
            sess = ort_session(path, providers, device_id=gpu)  # the graph is in memory now: the file may go
        run = ort_call(sess, {i.name: cpu_inputs[i.name].numpy() for i in sess.get_inputs()}, gpu)
        # The report's row says where it ran: the CPU, should the CUDA provider have fallen back.
        run.device = str(where) if device_in_use(sess, providers) == "cuda" else "cpu"  # type: ignore[attr-defined]
        return run

    return Runtime(prepare, cuda_events=False)
