"""Does UPop beat the simpler choices? The paper's ablation, on the built-in demo tasks.

With the same search and retrain budget, at ratios 0.5 and 0.75:
  (a) upop               unified ranking + progressive schedule (the method)
  (b) unified-once       the same unified ranking, applied at once at the end of the search
  (c) uniform-magnitude  every module loses p of its units, smallest L1 weight first
Prints the test primary metric of each (mean ± spread over seeds) next to the unpruned model.

    python benchmarks/ablation.py [--demos demo-blip demo-clip demo-vit] [--seeds 0 1] [--ratios 0.5 0.75]
        [--methods upop ...] [--search-lr-schedule constant|cosine]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import upop
from upop.api import open_model, setup_task
from upop.models.demo import DEMOS, shapes_dir

METHODS = ("upop", "unified-once", "uniform-magnitude")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demos", nargs="*", default=list(DEMOS))
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.75])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--search-epochs", type=int, default=None)
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--search-lr-schedule", default="constant", choices=("constant", "cosine"))
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args()
    console = Console(stderr=True)
    rows, raw = [], []
    for demo in args.demos:
        spec = DEMOS[demo]
        src = open_model(demo, None)
        ts = setup_task(src, None, shapes_dir(), None, spec.batch_size, 0)
        base = ts.report_fn(src.model)["primary"]
        for ratio in args.ratios:
            cells = {}
            for method in args.methods:
                vals = []
                for seed in args.seeds:
                    t0 = time.perf_counter()
                    cfg = upop.CompressConfig(
                        ratio=ratio,
                        search=upop.SearchConfig(epochs=args.search_epochs or spec.compress_search_epochs,
                                                 lr=spec.compress_lr, seed=seed, method=method,
                                                 lr_schedule=args.search_lr_schedule),
                        retrain=upop.RetrainConfig(epochs=args.retrain_epochs or spec.compress_retrain_epochs,
                                                   lr=spec.compress_lr, seed=seed))
                    res = upop.compress(demo, cfg, batch_size=spec.batch_size)
                    v = res.report.metrics["after"]["primary"]
                    vals.append(v)
                    raw.append({"demo": demo, "ratio": ratio, "method": method, "seed": seed, "metric": v,
                                "search_lr_schedule": args.search_lr_schedule,
                                "baseline": base, "seconds": time.perf_counter() - t0})
                    console.log(f"{demo} p={ratio} {method} seed {seed}: {v:.2f} ({time.perf_counter() - t0:.0f}s)")
                    if args.json:
                        args.json.write_text(json.dumps(raw, indent=2))
                cells[method] = vals
            rows.append((demo, ts.task.primary, base, ratio, cells))
    table = Table(title="ablation on the demo tasks (test split, after retraining; mean ± half-range over seeds)")
    for col in ("demo", "metric", "unpruned", "ratio", *args.methods):
        table.add_column(col, justify="left" if col in ("demo", "metric") else "right")
    for demo, metric, base, ratio, cells in rows:
        fmt = [f"{statistics.mean(v):.2f} ± {(max(v) - min(v)) / 2:.2f}" for v in (cells[m] for m in args.methods)]
        table.add_row(demo, metric, f"{base:.2f}", f"{ratio}", *fmt)
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
