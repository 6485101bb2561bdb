from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .latest import source_or_latest
from .out import console, print_json


def run(source: str | None, fmt: str, out: str | None, fp16: bool, batch: str, opset: int, overwrite: bool,
        quiet: bool, as_json: bool = False) -> None:
    import json

    from upop.exporters import get
    from upop.hub import network_rule

    exporter = get(fmt)
    source = source_or_latest(source, "export")
    network_rule(source)
    out_dir = Path(out) if out else Path("upop-export") / f"{Path(source.rstrip('/')).name}-{fmt}"
    log = console(stderr=True, quiet=quiet)
    kwargs = {"fp16": fp16, "opset": opset, "overwrite": overwrite, "progress": lambda m: log.print(m)}
    if fmt == "trt":
        kwargs["batch"] = batch
    manifest = exporter(source, out_dir, **kwargs)
    if as_json:
        record = out_dir / "export.json"
        data = json.loads(record.read_text()) if record.is_file() else manifest
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
