from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .latest import source_or_latest
from .out import console, print_json


def _batch_option(fmt: str, batch: str | None) -> dict[str, str]:
    """``--batch`` is TensorRT's optimization profile: checked before any work, refused for ONNX (whose
    graphs take any batch) rather than ignored."""
    from upop.errors import ConfigError

    if fmt != "trt":
        if batch is not None:
            raise ConfigError(f"--batch {batch} is TensorRT's optimization profile: it does not apply to "
                              f"--format {fmt} (its graphs take any batch size); drop it")
        return {}
    from upop.exporters.tensorrt import ShapeRange

    ShapeRange.parse(batch or DEFAULT_TRT_BATCH)
    return {"batch": batch or DEFAULT_TRT_BATCH}


DEFAULT_TRT_BATCH = "1:8:32"


def run(source: str | None, fmt: str, out: str | None, fp16: bool, batch: str | None, opset: int, overwrite: bool,
        quiet: bool, as_json: bool = False) -> None:
    from upop.exporters import get
    from upop.hub import network_rule
    from upop.safety import check_replace, read_json

    exporter = get(fmt)
    extra = _batch_option(fmt, batch)
    source = source_or_latest(source, "export")
    network_rule(source)
    out_dir = Path(out) if out else Path("upop-export") / f"{Path(source.rstrip('/')).name}-{fmt}"
    check_replace(out_dir, overwrite=overwrite, sources=[source], kind="export")
    log = console(stderr=True, quiet=quiet)
    kwargs = {"fp16": fp16, "opset": opset, "overwrite": overwrite, "progress": lambda m: log.print(m), **extra}
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
        con.print(f"export: {out_dir}", soft_wrap=True)
    else:
        con.print(f"wrote {len(manifest['engines'])} TensorRT engine(s) to {out_dir}", soft_wrap=True)


def run_predict(export_dir: str, images: list[str], texts: list[str], fp16: bool) -> None:
    from upop.exporters.predict import predict
    from upop.hub import network_rule

    network_rule(export_dir)
    result = predict(export_dir, images, texts, fp16)
    con = console()
    for line in result.lines:
        con.print(line)
    con.print(f"[dim]providers: {result.providers}[/dim]")
