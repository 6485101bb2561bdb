"""The runtimes upop deploys to and measures in, one ``Backend`` object each, in one registry.

A runtime is one file in ``exporters/runtimes/`` (found there: nothing lists it) that subclasses ``Backend``
and registers an instance with ``register``. The CLI (``upop export --format``, ``upop profile --runtime``,
``upop eval --runtime``, the compress report's latency rows), calibration's timers and the profile checks
iterate this registry; none of them compares a runtime's name. Each runtime has ONE name, used in files,
reports and profiles; its ``aliases`` are older spellings that only the command line maps to the name.

This module imports no runtime: a backend imports its package inside its methods, so listing the runtimes
costs nothing and a missing package is one clear line (``require``) when the runtime is asked for.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upop.errors import ConfigError, RuntimeUnavailable, UnknownFormatError, UnknownRuntimeError

_BACKENDS: dict[str, "Backend"] = {}


class Backend:
    """One runtime. Subclasses set the class attributes and override what the runtime can do; what it cannot
    do says so in one line (``ConfigError``) rather than doing something else."""

    name: str = ""                  # the one name: CLI, files, reports, profiles
    aliases: tuple[str, ...] = ()   # older spellings, accepted on the command line only
    title: str = ""                 # for people: "ONNX Runtime"
    package: str | None = None      # the module it imports (None: always there)
    extra: str | None = None        # pip install "upop[extra]" brings it
    exports: bool = False           # upop export --format NAME writes its folder
    marker_kind: str = "export"     # the ownership kind (upop.run.safety) of the folders it writes
    devices: tuple[str, ...] = ("cpu",)
    in_report: bool = False         # measured in the compress report whenever it is installed

    # ---- presence -------------------------------------------------------------------------------------
    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def require(self) -> None:
        """One clear error when the package is missing, naming the extra that brings it."""
        if not self.available():
            how = f'pip install "upop[{self.extra}]"' if self.extra else f"pip install {self.package}"
            raise RuntimeUnavailable(f"{self.title} is not installed: {how}")

    def check_device(self, device: str) -> None:
        if device.split(":")[0] not in self.devices:
            raise ConfigError(f"{self.title} runs on {' or '.join(self.devices)} here, not --device {device}")

    # ---- export ---------------------------------------------------------------------------------------
    def export(self, source: str | Path, out_dir: str | Path, **options: Any) -> dict[str, Any]:
        raise ConfigError(f"{self.title} has no export of its own ({self.name} is not an --format)")

    def takes_batch(self, batch: str | None, precision: str | None) -> str | None:
        """``upop export --batch``: checked and returned when this runtime uses it (a shape range, say)."""
        return batch

    def export_options(self, fp16: bool, precision: str | None, batch: str | None,
                       precision_options: Callable[[bool], Any]) -> dict[str, Any]:
        """The keyword arguments of ``export`` for the CLI's precision flags; ``precision_options(fp16)``
        builds the ``PrecisionOptions`` (calibration data, metric) when they are needed."""
        if fp16 or precision is not None:
            raise ConfigError(f"--format {self.name} exports FP32 graphs only, not --precision {precision or 'fp16'}")
        return {}

    def summary(self, manifest: dict[str, Any], source: str, out_dir: Path, opset: int) -> list[Any]:
        """What ``upop export`` prints after the export (strings or rich renderables)."""
        return [f"export ({self.title}): {out_dir}"]

    # ---- measurement ----------------------------------------------------------------------------------
    def profile(self, target: str, batches: list[int], device: str, precision: str, warmup: int,
                runs: int) -> list[Any]:
        """``upop profile --runtime NAME``: ``upop.latency.timing.Timing`` rows of every graph at every batch."""
        raise ConfigError(f"{self.title} cannot profile here")

    def block_timer(self, device: Any, precision: str) -> Any:
        """The calibration timer (``upop.latency.calibrate.BlockTimer``) of this runtime."""
        raise ConfigError(f"{self.title} has no calibration timer")

    def report_runtime(self, device: Any) -> Any:
        """The compress report's measurement (``upop.latency.measure.Runtime``), or None: not in the report."""
        return None

    # ---- running an export folder ---------------------------------------------------------------------
    def owns(self, folder: Path) -> bool:
        """Whether ``folder`` is an export of this runtime (what profile and eval run as they are)."""
        return False

    def open_graphs(self, folder: Path, device: str) -> Any:
        """``(GraphModel, the folder of its export.json, the largest batch or None)`` for ``upop eval``."""
        raise ConfigError(f"{self.title} cannot run an export folder for upop eval")


def register(backend: Backend) -> Backend:
    if not backend.name or backend.name != backend.name.lower():
        raise ValueError(f"a runtime's name is a lowercase word, not {backend.name!r}")
    for other in _BACKENDS.values():
        clash = {backend.name, *backend.aliases} & {other.name, *other.aliases}
        if other.name != backend.name and clash:
            raise ValueError(f"runtime {backend.name} takes {sorted(clash)} from {other.name}")
    _BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _BACKENDS.pop(name, None)


def canonical(name: str, what: str = "--runtime") -> str:
    """The one name of a runtime asked for by its name or an older spelling (the CLI's edge)."""
    for b in _BACKENDS.values():
        if name == b.name or name in b.aliases:
            return b.name
    if what == "--format":
        formats = ", ".join(_spelled(b) for b in _sorted() if b.exports)
        raise UnknownFormatError(f"export format {name!r} is not supported; supported formats: {formats}")
    raise UnknownRuntimeError(f"{what} {name!r} is not a runtime upop knows; known: "
                              f"{', '.join(_spelled(b) for b in _sorted())}")


def _sorted() -> list[Backend]:
    return [_BACKENDS[k] for k in sorted(_BACKENDS)]


def _spelled(b: Backend) -> str:
    return f"{b.name} (or {', '.join(b.aliases)})" if b.aliases else b.name


def lookup(name: str) -> Backend:
    if name not in _BACKENDS:
        canonical(name)  # the one line listing the known ones
        raise UnknownRuntimeError(f"{name!r} is an older spelling: say {canonical(name)!r}")
    return _BACKENDS[name]
