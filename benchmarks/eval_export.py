"""The task metric of each fp32 ONNX export next to its PyTorch model's, on a whole split (``upop eval``).

Each model (a demo name or a slim checkpoint folder) is exported to a temporary folder with ``upop export``'s
backend, then evaluated twice with the same task object settings: once in PyTorch, once with every forward run
by ONNX Runtime (CPU). Prints the primary metric of both and the largest difference over all the task's
metrics (no timings: the two evaluations are not timed alike, the first one decodes the images from disk).

    python benchmarks/eval_export.py [--models demo-vit demo-clip demo-blip demo-blip-nlvr] [--split test]
        [--data DIR] [--limit N] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from upop.api import open_model, setup_task
from upop.exporters import get
from upop.exporters.evaluate import evaluate_export

DEMOS = ["demo-vit", "demo-clip", "demo-blip", "demo-blip-nlvr"]


def _pytorch(model: str, data: str | None, split: str, limit: int | None,
             batch_size: int) -> tuple[str, str, dict[str, float]]:
    src = open_model(model)
    src.model.to(torch.device("cpu"))
    ts = setup_task(src, None, data, None, batch_size, 0, limit)
    ts.task.eval_batch_size = batch_size
    return ts.task.name, ts.task.primary, ts.task.evaluate(src.model, split, limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=DEMOS)
    ap.add_argument("--data", default=None, help="the data folder (default: the demos' own)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    table = Table(title=f"fp32 ONNX export vs PyTorch, {args.split} split, ONNX Runtime CPU")
    for col in ("model", "task", "metric", "PyTorch", "ONNX Runtime", "max |diff| (all metrics)"):
        table.add_column(col, justify="left" if col in ("model", "task", "metric") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            task, primary, ref = _pytorch(model, args.data, args.split, args.limit, args.batch_size)
            out = Path(tmp) / Path(model).name
            get("onnx")(model, out)
            got = evaluate_export(out, data=args.data, split=args.split, batch_size=args.batch_size, limit=args.limit)
            diff = max(abs(got[k] - v) for k, v in ref.items())
            table.add_row(model, task, primary, f"{ref['primary']:.2f}", f"{got['primary']:.2f}", f"{diff:.2g}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
