"""ONNX Runtime CPU latency of every exported graph, original vs slim at p = 0.5, next to FLOPs.

Random weights on a mid-size config (hidden 384, 6 layers, 224 px, 32 text tokens): latency does
not depend on the weights' values. The goal (issue 5): speedup >= 0.9 × the FLOPs ratio.

    python benchmarks/export_latency.py [--families vit clip blip] [--batches 1 8] [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

import upop
from upop.adapters import all_adapters
from upop.exporters import get
from upop.exporters.graphs import export_graphs
from upop.exporters.timing import ort_session

SEQ = 32


def graph_flops(graph, batch: int) -> int:
    inputs = graph.make_inputs(batch, SEQ)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        graph.module(*inputs.values())
    return counter.get_total_flops()


def latency(path: Path, graph, batch: int, runs: int, threads: int) -> float:
    sess = ort_session(path, threads=threads)
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v.numpy() for k, v in graph.make_inputs(batch, SEQ).items() if k in names}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    table = Table(title=f"ONNX Runtime CPU p50 latency, {args.threads} threads: original vs slim (p=0.5)")
    for col in ("model", "graph", "batch", "orig ms", "slim ms", "speedup", "FLOPs ratio", "speedup / FLOPs ratio"):
        table.add_column(col, justify="left" if col in ("model", "graph") else "right")
    console = Console(stderr=True)
    for adapter in all_adapters():
        if args.families and adapter.family not in args.families:
            continue
        for cls in adapter.classes:
            torch.manual_seed(0)
            model = adapter.build(cls, adapter.random_config(cls, hidden=384, layers=6, heads=6, image_size=224,
                                                            patch_size=16, vocab=1000))
            with tempfile.TemporaryDirectory() as tmp:
                orig_dir = Path(tmp) / "orig"
                model.save_pretrained(orig_dir)
                g = torch.Generator().manual_seed(0)
                batches = [adapter.example_inputs(model, batch_size=2, seq_len=SEQ, generator=g)]
                cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1, lr=0.0),
                                          retrain=upop.RetrainConfig(epochs=0))
                res = upop.compress(model, cfg, batches=batches)
                slim_dir = res.save(Path(tmp) / "slim", with_report=False)
                get("onnx")(str(orig_dir), Path(tmp) / "orig-onnx")
                get("onnx")(slim_dir, Path(tmp) / "slim-onnx")
                orig_graphs = export_graphs(upop.models.hub.load_pretrained(str(orig_dir)).model.eval(), adapter)
                slim_graphs = export_graphs(upop.load(slim_dir), adapter)
                for go, gs in zip(orig_graphs, slim_graphs):
                    for b in args.batches:
                        fo, fs = graph_flops(go, b), graph_flops(gs, b)
                        lo = latency(Path(tmp) / "orig-onnx" / f"{go.name}.onnx", go, b, args.runs, args.threads)
                        ls = latency(Path(tmp) / "slim-onnx" / f"{gs.name}.onnx", gs, b, args.runs, args.threads)
                        table.add_row(cls, go.name, str(b), f"{lo:.2f}", f"{ls:.2f}", f"{lo / ls:.2f}×",
                                      f"{fo / fs:.2f}×", f"{(lo / ls) / (fo / fs):.2f}")
            console.log(f"done {cls}")
    Console(width=170).print(table)


if __name__ == "__main__":
    np.random.seed(0)
    main()
