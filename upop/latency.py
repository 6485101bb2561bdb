"""Latency on the machine at hand: every deployment graph, several batch sizes, p50/p90/p99.

Warm-up runs first, then timed runs: CUDA events on a GPU (host timers would measure the launch,
not the kernels), ``perf_counter`` on the CPU. For ONNX Runtime the provider a session actually
uses is recorded, because the GPU build falls back to the CPU silently.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

SEQ = 32
#: dynamic axes that count items (the rest of the named axes count tokens: sequence, answer, past, total)
BATCH_AXES = ("batch", "images", "texts")


def is_batch_axis(dim: Any) -> bool:
    return dim in BATCH_AXES


def feed_shape(dims: Sequence[Any], batch: int, seq: int = SEQ) -> list[int]:
    """A concrete shape for an exported input: item axes take ``batch``, token axes ``seq``, fixed sizes stay."""
    return [batch if is_batch_axis(d) else (seq if isinstance(d, str) else int(d)) for d in dims]


@dataclass
class Run:
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


def _run(target: str, runtime: str, device: str, precision: str, graph: str, batch: int, ms: list[float],
         provider: str = "") -> Run:
    p50 = percentile(ms, 0.5)
    return Run(target, runtime, device, precision, graph, batch, p50, percentile(ms, 0.9), percentile(ms, 0.99),
               1000.0 * batch / p50 if p50 > 0 else 0.0, provider)


def profile_torch(model: torch.nn.Module, adapter: Any, target: str, batches: Sequence[int], device: torch.device,
                  precision: str = "fp32", warmup: int = 5, runs: int = 30) -> list[Run]:
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 latency needs a CUDA device (--device cuda)")
    model = model.eval().to(device)
    if precision == "fp16":
        model = model.half()
    out = []
    for graph in adapter.export_graphs(model):
        for b in batches:
            inputs = {k: v.to(device) for k, v in graph.make_inputs(b, SEQ).items()}
            if precision == "fp16":
                inputs = {k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.inference_mode():
                ms = time_fn(lambda: graph.module(*inputs.values()), warmup, runs, device.type == "cuda")
            out.append(_run(target, "torch", str(device), precision, graph.name, b, ms))
    return out


def ort_session(path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session with upop's settings (quiet log; CPU unless providers say otherwise)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))


def profile_ort(export_dir: str | Path, target: str, batches: Sequence[int], device: str = "cpu",
                precision: str = "fp32", warmup: int = 5, runs: int = 30, threads: int | None = None) -> list[Run]:
    import json

    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((Path(export_dir) / "export.json").read_text())
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError("ONNX Runtime here has no CUDA provider: install the gpu extra (onnxruntime-gpu)")
    out = []
    for g in manifest["graphs"]:
        if precision == "fp16" and "fp16" not in g:
            raise ConfigError(f"{export_dir} has no FP16 graphs: export with --fp16")
        path = Path(export_dir) / (g["fp16"]["file"] if precision == "fp16" else g["file"])
        sess = ort_session(path, wanted, threads)
        provider = sess.get_providers()[0]
        for b in batches:
            feed = {}
            for inp in sess.get_inputs():
                spec = next(i for i in g["inputs"] if i["name"] == inp.name)
                shape = feed_shape(spec["shape"], b)
                if spec["dtype"].startswith("int"):
                    feed[inp.name] = np.ones(shape, dtype=spec["dtype"])
                else:
                    feed[inp.name] = np.random.default_rng(0).standard_normal(shape).astype(spec["dtype"])
            ms = time_fn(lambda: sess.run(None, feed), warmup, runs, cuda=False)
            out.append(_run(target, "ort", device, precision, g["name"], b, ms, provider))
    return out


def profile_trt(target: str, batches: Sequence[int], device: str = "cuda", precision: str = "fp32", warmup: int = 5,
                runs: int = 30, seq: int = SEQ) -> list[Run]:
    """TensorRT latency of a ``upop export --format trt`` folder, or of a model whose engines are built
    first (in a temporary folder, at ``precision``, for the asked batch sizes). Untested here: no TensorRT."""
    import tempfile

    from .exporters.tensorrt import export_trt, profile_engines, require_tensorrt

    require_tensorrt()
    if not device.startswith("cuda"):
        raise ConfigError("TensorRT runs on a CUDA device: --device cuda")
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {precision!r}")

    def rows(folder: str | Path) -> list[Run]:
        return [_run(target, "trt", device, precision, r["graph"], r["batch"], r["ms"], "TensorRT")
                for r in profile_engines(folder, list(batches), seq, warmup, runs)]

    if (Path(target) / "engines.json").is_file():
        return rows(target)
    lo, hi = min(batches), max(batches)
    with tempfile.TemporaryDirectory() as tmp:
        export_trt(target, Path(tmp) / "trt", fp16=precision == "fp16", batch=f"{lo}:{hi}:{hi}",
                   seq=f"1:{seq}:{max(seq, 64)}")
        return rows(Path(tmp) / "trt")


def totals(runs: Sequence[Run]) -> dict[int, float]:
    """p50 of the whole pipeline (all graphs in sequence) per batch size."""
    out: dict[int, float] = {}
    for r in runs:
        out[r.batch] = out.get(r.batch, 0.0) + r.p50_ms
    return out


def speedup(baseline: Sequence[Run], candidate: Sequence[Run]) -> float:
    """Geometric mean over batch sizes of baseline / candidate pipeline p50."""
    a, b = totals(baseline), totals(candidate)
    ratios = [a[k] / b[k] for k in a if k in b and b[k] > 0]
    return float(statistics.geometric_mean(ratios)) if ratios else float("nan")
