"""ONNX Runtime sessions with upop's settings (shared by the export parity check, ``predict`` and timing)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
_said: set[str] = set()


def cuda_device_id(device: Any) -> int:
    """The GPU a session runs on: the device's own index (``cuda:1``), else this process's LOCAL_RANK (under
    torchrun rank r uses GPU r, as PyTorch does; without a device id every rank would share GPU 0)."""
    if isinstance(device, str):
        device = torch.device(device)
    index = device.index if isinstance(device, torch.device) else None
    return int(index) if index is not None else int(os.environ.get("LOCAL_RANK", "0") or 0)


def ort_session(path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                device_id: int | None = None) -> Any:
    """An ONNX Runtime session with upop's settings (quiet log; CPU unless providers say otherwise; the CUDA
    provider on GPU ``device_id``, else LOCAL_RANK's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    gpu = cuda_device_id(None) if device_id is None else device_id
    chosen: list[Any] = [(p, {"device_id": str(gpu)}) if p == CUDA_EP else p
                         for p in (providers or [CPU_EP])]
    return ort.InferenceSession(str(path), opts, providers=chosen)


def device_in_use(sess: Any, wanted: Sequence[str]) -> str:
    """``cuda`` or ``cpu``: where the session really runs. ONNX Runtime falls back to the CPU without a word
    when its CUDA provider cannot load (a missing cuDNN, a driver too old): said here in one line, once."""
    if CUDA_EP in sess.get_providers():
        return "cuda"
    if CUDA_EP in wanted:
        note = ("upop: ONNX Runtime could not start its CUDA provider (missing CUDA/cuDNN libraries?) and runs "
                "on the CPU: its timings are CPU timings")
        if note not in _said:
            _said.add(note)
            print(note, file=sys.stderr)
    return "cpu"


def ort_call(sess: Any, feed: dict[str, Any], device_id: int) -> Callable[[], Any]:
    """One run of ``sess`` on ``feed`` (numpy arrays), as timing wants it. On the CUDA provider the inputs are
    copied to the GPU once and the outputs stay there (IO binding), so a run times the model, not host↔device
    copies, as PyTorch is timed with its inputs on the device; ``run_with_iobinding`` returns when the GPU
    is done."""
    if CUDA_EP not in sess.get_providers():
        return lambda: sess.run(None, feed)
    import onnxruntime as ort

    binding = sess.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", device_id) for k, v in feed.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", device_id)
    sess.run_with_iobinding(binding)  # allocates the outputs on the GPU; later runs write into them
    for out, value in zip(sess.get_outputs(), binding.get_outputs()):
        binding.bind_ortvalue_output(out.name, value)

    def run() -> Any:
        sess.run_with_iobinding(binding)
        return values  # kept alive with the binding

    return run


def synthetic_feed(entry: dict[str, Any], sess: Any, batch: int) -> dict[str, Any]:
    """Inputs for timing graph ``entry`` (an ``export.json`` graph) in ``sess`` at ``batch``: ones for ids and
    masks, seeded normal values for floats (the values do not change the time)."""
    import numpy as np

    from upop.latency.timing import feed_shape

    feed = {}
    for inp in sess.get_inputs():
        spec = next(i for i in entry["inputs"] if i["name"] == inp.name)
        shape = feed_shape(spec["shape"], batch)
        if spec["dtype"].startswith("int"):
            feed[inp.name] = np.ones(shape, dtype=spec["dtype"])
        else:
            feed[inp.name] = np.random.default_rng(0).standard_normal(shape).astype(spec["dtype"])
    return feed
