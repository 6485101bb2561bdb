from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

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


DEFAULT_TRT_BATCH = "1:8:32"


def _batch_option(fmt: str, batch: str | None, precision: str | None) -> str:
    """``--batch``: TensorRT's optimization profile, and the deployment table's latency batch. An ONNX export
    without a precision has neither (its graphs take any batch): there it is refused rather than ignored."""
    if fmt != "trt" and batch is not None and precision is None:
        raise ConfigError(f"--batch {batch} is TensorRT's optimization profile or the latency batch of --precision's "
                          f"table: it does not apply to a plain --format {fmt} export (its graphs take any batch size); drop it")
    if fmt == "trt" or (batch is not None and ":" in batch):  # a range is checked wherever it is given
        from upop.exporters.tensorrt import ShapeRange

        ShapeRange.parse(batch or DEFAULT_TRT_BATCH)
    return batch or DEFAULT_TRT_BATCH


def run(source: str | None, fmt: str, out: str | None, fp16: bool, batch: str | None, opset: int, overwrite: bool,
        quiet: bool, as_json: bool = False, quant: QuantArgs | None = None) -> None:
    from upop.datasets.readers import outside_data_allowed
    from upop.exporters import get
    from upop.models.hub import network_rule
    from upop.run.safety import check_replace, read_json

    exporter = get(fmt)
    q = quant or QuantArgs()
    batch = _batch_option(fmt, batch, "fp16" if fp16 else q.precision)
    source = source_or_latest(source, "export")
    network_rule(source)
    out_dir = Path(out) if out else Path("upop-export") / f"{Path(source.rstrip('/')).name}-{fmt}"
    check_replace(out_dir, overwrite=overwrite, sources=[source], kind="export")
    log = console(stderr=True, quiet=quiet)
    kwargs: dict[str, Any] = {"opset": opset, "overwrite": overwrite, "progress": lambda m: log.print(m)}
    if fmt == "trt":
        mode = _trt_precision(fp16, q)
        kwargs.update(batch=batch, fp16=mode == "fp16",
                      precision=precision_options(source, False, batch, q) if mode == "int8" else None)
    else:
        kwargs.update(fp16=fp16, precision=precision_options(source, fp16, batch, q))
    with outside_data_allowed(q.allow_outside_data):
        manifest = exporter(source, out_dir, **kwargs)
    if as_json:
        from upop.errors import ExportFolderError

        record = out_dir / "export.json"
        data = read_json(record, ExportFolderError) if record.is_file() else manifest
        print_json({**data, "out": str(out_dir.resolve())})
    if quiet:
        return
    con = console(stderr=as_json)
    if fmt == "onnx":
        table = Table(title=f"{source} → {out_dir} (ONNX opset {opset}, parity vs PyTorch)")
        for col in ("graph", "output", "batch", "max abs", "max rel", "tolerance", "fp16 max abs"):
            table.add_column(col, justify="left" if col in ("graph", "output") else "right")
        for g in manifest["graphs"]:
            half = {(p["batch"], p["output"]): p for p in g.get("fp16", {}).get("parity", [])}
            for p in g["parity"]:
                h = half.get((p["batch"], p["output"]))
                table.add_row(g["name"], p["output"], str(p["batch"]), f"{p['max_abs']:.2e}", f"{p['max_rel']:.2e}",
                              f"{p['tolerance']:.0e}", f"{h['max_abs']:.2e}" if h else "–")
        con.print(table)
        if "deployment" in manifest:
            con.print(deployment_table(manifest))
            for line in choice_lines(manifest):
                con.print(line, soft_wrap=True)
        con.print(f"export: {out_dir}", soft_wrap=True)
    else:
        con.print(f"wrote {len(manifest['engines'])} TensorRT engine(s) to {out_dir}", soft_wrap=True)


def _trt_precision(fp16: bool, q: QuantArgs) -> str:
    if fp16 and q.precision not in (None, "fp16"):
        raise ConfigError(f"--fp16 is --precision fp16: give one of --fp16 and --precision {q.precision}")
    precision = "fp16" if fp16 else (q.precision or "fp32")
    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"--format trt builds fp32, fp16 or int8 engines, not {precision} (int8-dynamic is ONNX "
                          "Runtime's own operators; auto measures in ONNX Runtime: export --format onnx)")
    return precision


def _ms(row: dict[str, Any], batch: str) -> str:
    lat = row["latency"][batch]
    return f"{lat['p50_ms']:.2f} / {lat['p90_ms']:.2f}"


def deployment_table(manifest: dict[str, Any]) -> Table:
    """The deployment table: metric, size, latency and speedups per precision, and its parity."""
    dep = manifest["deployment"]
    batches = [str(b) for b in dep["batches"]]
    chosen = manifest.get("precision")
    table = Table(title=f"deployment ({dep['runtime']} {dep['device']}; latency p50 / p90 ms, every graph once)")
    cols = ["precision", "val", "test", "size MB", *(f"batch {b}" for b in batches), f"vs fp32 @{batches[-1]}"]
    original = any("speedup_vs_original" in r for r in dep["rows"])
    cols += [f"vs original @{batches[-1]}"] if original else []
    for col in [*cols, "parity"]:
        table.add_column(col, justify="left" if col in ("precision", "parity") else "right")
    for r in dep["rows"]:
        metric = [f"{r[k]:.2f}" if r.get(k) is not None else "–" for k in ("metric_val", "metric_test")]
        par = r["parity"]
        parity = f"cos ≥ {par['min_cosine']:.4f}" if "min_cosine" in par else f"max abs {par['max_abs']:.1e}"
        cells = [r["precision"] + (" *" if r["precision"] == chosen else ""), *metric, f"{r['size_bytes'] / 1e6:.2f}",
                 *(_ms(r, b) for b in batches), f"{r['speedup_vs_fp32'][batches[-1]]:.2f}×"]
        cells += [f"{r['speedup_vs_original'][batches[-1]]:.2f}×"] if original else []
        table.add_row(*cells, parity)
    return table


def choice_lines(manifest: dict[str, Any]) -> list[str]:
    lines = []
    if manifest.get("calibration"):
        c = manifest["calibration"]
        lines.append(f"int8 calibrated on {c['count']} {c['split']} items ({c['method']}, seed {c['seed']}, "
                     f"items {c['items_sha256'][:12]})")
    if manifest.get("choice"):
        ch = manifest["choice"]
        lines.append(f"auto chose {ch['chosen']} ({ch['rule']})")
        lines += [f"  {why}" for why in ch["reasons"].values()]
    elif all(r.get("metric_val") is None for r in manifest["deployment"]["rows"]):
        lines.append("no task metric here (upop eval of an export is not available): parity only")
    return lines


def run_predict(export_dir: str, images: list[str], texts: list[str], fp16: bool) -> None:
    from upop.exporters.predict import predict
    from upop.models.hub import network_rule

    network_rule(export_dir)
    result = predict(export_dir, images, texts, fp16)
    con = console()
    for line in result.lines:
        con.print(line)
    con.print(f"[dim]providers: {result.providers}[/dim]")
