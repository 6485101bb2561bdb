"""ONNX Runtime: ``upop export --format onnxruntime`` (older spellings ``onnx``, ``ort``) writes the ONNX graphs
with their parity and precision table; profiling, calibration and the compress report run them in ONNX Runtime
(its CUDA provider on a GPU when installed)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from upop.errors import ConfigError

from ..registry import Backend, register

DEFAULT_BATCH = "1:8:32"  # the deployment table's latency batch is its middle value


class OnnxRuntime(Backend):
    name, aliases, title = "onnxruntime", ("ort", "onnx"), "ONNX Runtime"
    package, extra, exports, devices, in_report = "onnxruntime", "cpu", True, ("cpu", "cuda"), True

    def export(self, source: str | Path, out_dir: str | Path, **options: Any) -> dict[str, Any]:
        from ..onnx import export_onnx

        self.require()
        return export_onnx(source, out_dir, **options)

    def takes_batch(self, batch: str | None, precision: str | None) -> str | None:
        """No batch for the graphs themselves (they take any); the latency batch of --precision's table."""
        if batch is not None and precision is None:
            raise ConfigError(f"--batch {batch} is TensorRT's optimization profile or the latency batch of --precision's "
                              f"table: it does not apply to a plain --format {self.name} export (its graphs take any batch "
                              "size); drop it")
        if batch is not None and ":" in batch:  # a range is checked wherever it is given
            from ..tensorrt import ShapeRange

            ShapeRange.parse(batch)
        return batch or DEFAULT_BATCH

    def export_options(self, fp16: bool, precision: str | None, batch: str | None, precision_options: Any) -> dict[str, Any]:
        return {"fp16": fp16, "precision": precision_options(fp16)}

    def summary(self, manifest: dict[str, Any], source: str, out_dir: Path, opset: int) -> list[Any]:
        out: list[Any] = [parity_table(manifest, f"{source} → {out_dir} (ONNX opset {opset}, parity vs PyTorch)")]
        if "deployment" in manifest:
            out += [deployment_table(manifest), *choice_lines(manifest)]
        return out + [f"export: {out_dir}"]

    def profile(self, target: str, batches: list[int], device: str, precision: str, warmup: int,
                runs: int) -> list[Any]:
        from ..timing import profile_ort

        self.require()
        if self.owns(Path(target)):
            from ..runtime import OrtModel

            # An export folder may come from anywhere: its export.json is checked and every graph loaded once.
            OrtModel(target, fp16=precision == "fp16", providers=["CPUExecutionProvider"])
            return profile_ort(target, target, batches, device, precision, warmup, runs)
        with tempfile.TemporaryDirectory() as tmp:
            self.export(target, Path(tmp) / "graphs", fp16=precision == "fp16")
            return profile_ort(Path(tmp) / "graphs", target, batches, device, precision, warmup, runs)

    def block_timer(self, device: Any, precision: str) -> Any:
        from ..timing import ort_timer

        self.require()
        return ort_timer(device)

    def report_runtime(self, device: Any) -> Any:
        from ..timing import ort_runtime

        return ort_runtime(device)

    def owns(self, folder: Path) -> bool:
        return (folder / "export.json").is_file()

    def open_graphs(self, folder: Path, device: str) -> Any:
        """The ONNX graphs of an export folder; those of another runtime's folder (its ``onnx/``) too."""
        from ..runtime import OrtModel, read_export_manifest

        onnx_dir = folder if self.owns(folder) or not (folder / "onnx").is_dir() else folder / "onnx"
        read_export_manifest(onnx_dir)  # checked before any session is built
        return OrtModel(onnx_dir, providers=_providers(device)), onnx_dir, None


def _providers(device: str) -> list[str] | None:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        return None  # the GPU where ONNX Runtime has one, else the CPU
    if device.startswith("cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ConfigError(f"--device must be cpu, cuda or auto, not {device!r}")


def parity_table(manifest: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("graph", "output", "batch", "max abs", "max rel", "tolerance", "fp16 max abs"):
        table.add_column(col, justify="left" if col in ("graph", "output") else "right")
    for g in manifest["graphs"]:
        half = {(p["batch"], p["output"]): p for p in g.get("fp16", {}).get("parity", [])}
        for p in g["parity"]:
            h = half.get((p["batch"], p["output"]))
            table.add_row(g["name"], p["output"], str(p["batch"]), f"{p['max_abs']:.2e}", f"{p['max_rel']:.2e}",
                          f"{p['tolerance']:.0e}", f"{h['max_abs']:.2e}" if h else "–")
    return table


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


register(OnnxRuntime())
