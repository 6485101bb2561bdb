"""Exporters (installed as ``upop.exporters``): one registered backend per artefact format.

Each backend turns a slim checkpoint into deployable graphs and checks them against
PyTorch. Backends register themselves by format name; asking for an unknown format is a
clear error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from upop.errors import UnknownFormatError

from .registry import _BACKENDS, register

__all__ = ["UnknownFormatError", "formats", "get", "register"]


def formats() -> list[str]:
    _load_backends()
    return sorted(_BACKENDS)


def _load_backends() -> None:
    # Imported late: the backends pull in onnx / onnxruntime / tensorrt, which most commands never need.
    from . import onnx, tensorrt  # noqa: F401  (tensorrt itself is imported only when building)


def get(fmt: str) -> Callable[..., Any]:
    _load_backends()
    if fmt not in _BACKENDS:
        known = ", ".join(formats())
        raise UnknownFormatError(f"export format {fmt!r} is not supported; supported formats: {known}")
    return _BACKENDS[fmt]
