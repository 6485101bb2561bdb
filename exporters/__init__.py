"""Exporters (installed as ``upop.exporters``): one registered backend per runtime.

Each backend (a file in ``runtimes/``) turns a slim checkpoint into deployable graphs, checks them against
PyTorch and times them. Backends register themselves by name; asking for an unknown one is a clear error
that lists the known ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from upop.errors import UnknownFormatError

from . import registry
from .registry import _BACKENDS, Backend, lookup, register

__all__ = ["Backend", "UnknownFormatError", "backend", "backends", "canonical", "formats", "get", "register"]

_loaded = False


def _load_backends() -> None:
    """Every module of ``runtimes/`` once: a new runtime is a new file there, listed nowhere. The modules
    import their runtime's package inside their methods, so loading them all is cheap."""
    global _loaded
    if _loaded:
        return
    from . import runtimes as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _loaded = True


def backends() -> list[Backend]:
    """Every registered runtime, by name."""
    _load_backends()
    return [_BACKENDS[k] for k in sorted(_BACKENDS)]


def backend(name: str) -> Backend:
    """The runtime of that one name (older spellings are mapped by the CLI with ``canonical``)."""
    _load_backends()
    return lookup(name)


def canonical(name: str, what: str = "--runtime") -> str:
    """The one name of a runtime given by its name or an older spelling (``ort``, ``onnx``, ``trt``): what the
    CLI maps at its edge."""
    _load_backends()
    return registry.canonical(name, what)


def formats() -> list[str]:
    """The runtimes ``upop export --format`` writes a folder for."""
    return [b.name for b in backends() if b.exports]


def get(fmt: str) -> Callable[..., Any]:
    """The export function of a format, by its name or an older spelling (``onnx``, ``trt``)."""
    _load_backends()
    b = _BACKENDS[canonical(fmt, "--format")]
    if not b.exports:
        raise UnknownFormatError(f"export format {fmt!r} is not supported; supported formats: {', '.join(formats())}")
    return b.export
