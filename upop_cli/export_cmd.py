from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upop.errors import ConfigError

from .latest import source_or_latest
from .out import console, print_json


@dataclass
class QuantArgs:
    """The precision options of ``upop export`` (``--precision`` and what INT8 and ``auto`` need)."""

    precision: str | None = None
    calibration_size: int = 128
    calibration_method: str = "minmax"
    calibration_seed: int = 0
    max_drop: float = 1.0
    task: str | None = None
    data: str | None = None
    original: str | None = None
    allow_outside_data: bool = False  # calibration reads the data folder by evaluation's rules


def _latency_batch(batch: str) -> int:
    """The table's latency batch: N, or the OPT of a TensorRT profile MIN:OPT:MAX."""
    parts = batch.split(":")
    if len(parts) in (1, 3) and all(p.strip().isdigit() for p in parts) and int(parts[len(parts) // 2]) >= 1:
        return int(parts[len(parts) // 2])
    raise ConfigError(f"--batch must be N or MIN:OPT:MAX (positive integers), got {batch!r}")


def precision_options(source: str, fp16: bool, batch: str, q: QuantArgs) -> Any:
    """``PrecisionOptions`` for the export, or None for a plain FP32 export (no --precision, no --fp16)."""
    from upop.exporters.evaluate import task_metric
    from upop.exporters.precision import PrecisionOptions, calibration_task
    from upop.exporters.quantize import Calibration

    if fp16 and q.precision not in (None, "fp16"):
        raise ConfigError(f"--fp16 is --precision fp16: give one of --fp16 and --precision {q.precision}")
    precision = "fp16" if fp16 else q.precision
    if precision is None:
        return None
    opts = PrecisionOptions(precision, Calibration(q.calibration_size, q.calibration_method, q.calibration_seed),
                            q.max_drop, _latency_batch(batch), original=q.original)
    opts.metric_fn = task_metric(q.data)  # the call site of upop eval's evaluate_export
    opts.check()  # bad values (and auto without a metric) stop before the task is loaded
    if "int8" in opts.built():
        from upop.datasets.readers import outside_data_allowed

        with outside_data_allowed(q.allow_outside_data):
            opts.task = calibration_task(source, q.task, q.data)
    return opts


def run(source: str | None, fmt: str, out: str | None, fp16: bool, batch: str | None, opset: int, overwrite: bool,
        quiet: bool, as_json: bool = False, quant: QuantArgs | None = None) -> None:
    from upop.models.hub import network_rule
    from upop.run.safety import check_replace, read_json

    runtime = exporting_runtime(fmt)
    q = quant or QuantArgs()
    batch = runtime.takes_batch(batch, "fp16" if fp16 else q.precision)
    source = source_or_latest(source, "export")
    network_rule(source)
    out_dir = Path(out) if out else default_out(source, runtime.name)
    check_replace(out_dir, overwrite=overwrite, sources=[source], kind=runtime.marker_kind)
    manifest = export(runtime, source, out_dir, fp16, batch, opset, overwrite, console(stderr=True, quiet=quiet), q)
    if as_json:
        from upop.errors import ExportFolderError

        record = out_dir / "export.json"
        data = read_json(record, ExportFolderError) if record.is_file() else manifest
        print_json({**data, "out": str(out_dir.resolve())})
    if quiet:
        return
    con = console(stderr=as_json)
    for part in runtime.summary(manifest, source, out_dir, opset):
        con.print(part, soft_wrap=isinstance(part, str))


def exporting_runtime(fmt: str) -> Any:
    """The backend of an export format by any of its spellings; an unknown one is one line listing the known ones."""
    from upop.exporters import backend, canonical, get

    get(fmt)
    return backend(canonical(fmt, "--format"))


def default_out(source: str, runtime: str) -> Path:
    return Path("upop-export") / f"{Path(source.rstrip('/')).name}-{runtime}"


def export(runtime: Any, source: str, out_dir: Path, fp16: bool, batch: str | None, opset: int, overwrite: bool,
           log: Any, q: QuantArgs) -> dict[str, Any]:
    """One export whose flags and output folder are checked: the manifest it wrote."""
    from upop.datasets.readers import outside_data_allowed
    from upop.exporters import get

    kwargs: dict[str, Any] = {"opset": opset, "overwrite": overwrite, "progress": lambda m: log.print(m)}
    kwargs.update(runtime.export_options(fp16, q.precision, batch,
                                         lambda half: precision_options(source, half, batch or "1", q)))
    runtime.require()  # after the flags' own checks: a missing package is one line naming its extra
    with outside_data_allowed(q.allow_outside_data):
        return get(runtime.name)(source, out_dir, **kwargs)


@dataclass
class Chain:
    """``upop compress --export``: the slim model exported after the run, and, for the deployment table's
    speedups, the original model's FP32 export beside it (only when a precision is asked)."""

    runtime: Any
    slim_dir: Path
    original_dir: Path | None
    quant: QuantArgs
    batch: str | None

    def run(self, model: str, out: Path, overwrite: bool, log: Any) -> dict[str, Any]:
        """Both exports, then what the compress report keeps of the slim one's manifest."""
        if self.original_dir is not None:
            log.print(f"exporting the original model {model} to {self.original_dir} (the table's speedups)")
            export(self.runtime, model, self.original_dir, False, None, 17, overwrite, log, QuantArgs())
        log.print(f"exporting {out} to {self.slim_dir}")
        manifest = export(self.runtime, str(out), self.slim_dir, False, self.batch, 17, overwrite, log, self.quant)
        keep = ("precision", "deployment", "choice", "calibration")
        return {"runtime": self.runtime.name, "export": str(self.slim_dir),
                "original": str(self.original_dir) if self.original_dir else None,
                **{k: manifest[k] for k in keep if k in manifest}}


def plan_chain(o: dict[str, Any], model: str, out: Path, overwrite: bool) -> Chain | None:
    """The exports ``upop compress --export`` will write, every flag and folder checked before the run starts."""
    if not o.get("export"):
        return None
    from upop.run.safety import check_replace

    runtime = exporting_runtime(o["export"])
    q = QuantArgs(o.get("precision"), o.get("calibration_size") or 128, max_drop=1.0 if o.get("max_drop") is None
                  else o["max_drop"], task=o.get("task"), data=o.get("data"),
                  allow_outside_data=bool(o.get("allow_outside_data")))
    batch = runtime.takes_batch(None, q.precision)
    runtime.export_options(False, q.precision, batch, lambda half: None)  # a precision the runtime lacks: one line
    runtime.require()
    slim_dir = default_out(str(out), runtime.name)
    original_dir = default_out(model, runtime.name) if q.precision is not None else None
    for folder in (slim_dir, original_dir):
        if folder is not None:
            check_replace(folder, overwrite=overwrite, sources=[model, out], kind=runtime.marker_kind)
    if original_dir is not None:
        q.original = str(original_dir)
    return Chain(runtime, slim_dir, original_dir, q, batch)


def run_predict(export_dir: str, images: list[str], texts: list[str], fp16: bool) -> None:
    from upop.exporters.predict import predict
    from upop.models.hub import network_rule

    network_rule(export_dir)
    result = predict(export_dir, images, texts, fp16)
    con = console()
    for line in result.lines:
        con.print(line)
    con.print(f"[dim]providers: {result.providers}[/dim]")
