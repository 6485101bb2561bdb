"""ONNX Runtime sessions with upop's settings (shared by the export parity check, ``predict`` and timing)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def ort_session(path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session with upop's settings (quiet log; CPU unless providers say otherwise)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
