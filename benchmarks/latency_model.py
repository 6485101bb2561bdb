"""Calibrated latency model vs measurement, and what a calibrated profile changes in the search.

For each demo model: calibrate a profile on this machine (PyTorch, CPU), then compress at p = 0.5
with and without it, and print the predicted and measured (``measure_forward_ms``, the same
forward ``upop profile`` times) latency of each slim model, the error, and the test metric.
The goal (issue 6): predicted within 15 % of measured.

    python benchmarks/latency_model.py [--demos demo-vit demo-clip demo-blip]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import upop
from upop.latency.calibrate import calibrate, measure_forward_ms, to_toml
from upop.exporters.timing import block_timer
from upop.models.demo import DEMOS
from upop.latency.hardware import predicted_latency_ms
from upop.models.hub import load_pretrained
from upop.profiles import load, read_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demos", nargs="*", default=list(DEMOS))
    ap.add_argument("--mid", action="store_true", help="instead: mid-size random models (hidden 384, 6 layers, 224 px)")
    ap.add_argument("--runtime", default="torch", help="torch | onnxruntime | openvino (with --mid; older spelling ort)")
    args = ap.parse_args()
    if args.mid:
        from upop.exporters import canonical

        return mid_size(canonical(args.runtime))
    dev = torch.device("cpu")
    table = Table(title=f"calibrated latency model, PyTorch CPU ({torch.get_num_threads()} threads), batch 1")
    for col in ("demo", "search cost", "metric", "measured ms", "predicted ms", "error", "params kept"):
        table.add_column(col, justify="left" if col in ("demo", "search cost") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for demo in args.demos:
            src = load_pretrained(demo)
            prof_path = Path(tmp) / f"{demo}.toml"
            prof_path.write_text(to_toml(calibrate(src.model.eval(), src.adapter, load("cpu-x86"), device=dev)))
            prof = read_file(prof_path)
            full = measure_forward_ms(src.model, src.adapter, 1, 32, dev)
            table.add_row(demo, "(unpruned)", "", f"{full:.3f}", f"{predicted_latency_ms(src.model, src.adapter, prof):.3f}",
                          "", "100%")
            for label, profile in (("parameters", None), ("calibrated latency", str(prof_path))):
                spec = DEMOS[demo]
                cfg = upop.CompressConfig(ratio=0.5, profile=profile,
                                          search=upop.SearchConfig(epochs=spec.compress_search_epochs, lr=spec.compress_lr),
                                          retrain=upop.RetrainConfig(epochs=spec.compress_retrain_epochs,
                                                                     lr=spec.compress_lr))
                res = upop.compress(demo, cfg, batch_size=spec.batch_size)
                meas = measure_forward_ms(res.model, src.adapter, 1, 32, dev)
                pred = predicted_latency_ms(res.model, src.adapter, prof)
                r = res.report.to_dict()
                table.add_row(demo, label, f"{r['metrics']['after']['primary']:.2f}", f"{meas:.3f}", f"{pred:.3f}",
                              f"{100 * (pred - meas) / meas:+.1f}%",
                              f"{r['params']['after']['total'] / r['params']['before']['total']:.0%}")
    Console(width=150).print(table)


def mid_size(runtime: str = "torch") -> None:
    """Latency prediction where width, not overhead, sets the time: random weights, slimmed at 0.5."""
    from upop.adapters import all_adapters

    dev = torch.device("cpu")
    table = Table(title=f"calibrated latency model on mid-size models, {runtime} on CPU ({torch.get_num_threads()} threads)")
    for col in ("model", "ratio", "measured ms", "predicted ms", "error"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for adapter in all_adapters():
        if adapter.family not in ("vit", "clip", "blip"):
            continue
        cls = next(iter(adapter.classes))
        torch.manual_seed(0)
        model = adapter.build(cls, adapter.random_config(cls, hidden=384, layers=6, heads=6, image_size=224,
                                                        patch_size=16, vocab=1000)).eval()
        prof = read_file(_write(calibrate(model, adapter, load("cpu-x86"), device=dev, points=5, runtime=runtime,
                                          timer=block_timer(runtime, dev))))
        batch = adapter.example_inputs(model, batch_size=1, seq_len=32, generator=torch.Generator().manual_seed(0))
        table.add_row(cls, "0", f"{measure_forward_ms(model, adapter, 1, 32, dev, timer=block_timer(runtime, dev)):.2f}",
                      f"{predicted_latency_ms(model, adapter, prof):.2f}", "")
        for ratio in (0.3, 0.6):
            m = adapter.build(cls, model.config)
            m.load_state_dict(model.state_dict())
            res = upop.compress(m.eval(), upop.CompressConfig(ratio=ratio, search=upop.SearchConfig(steps=2, lr=0.0),
                                                              retrain=upop.RetrainConfig(epochs=0)), batches=[batch])
            meas = measure_forward_ms(res.model, adapter, 1, 32, dev, timer=block_timer(runtime, dev))
            pred = predicted_latency_ms(res.model, adapter, prof)
            table.add_row(cls, f"{ratio}", f"{meas:.2f}", f"{pred:.2f}", f"{100 * (pred - meas) / meas:+.1f}%")
    Console(width=150).print(table)


def _write(profile) -> Path:
    path = Path(tempfile.mkdtemp()) / "calibrated.toml"
    path.write_text(to_toml(profile))
    return path


if __name__ == "__main__":
    main()
