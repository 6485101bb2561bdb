"""Does distillation from the unpruned model recover what UPop loses? On the built-in demo tasks.

With the same search and retrain epochs, at each ratio and seed:
  (a) upop             the method alone
  (b) upop + logits    plus KL between the teacher's and the student's output distributions
  (c) upop + features  plus the relative MSE of every layer's hidden states
Prints the test primary metric of each (mean ± half-range over seeds) next to the unpruned model, the share of
UPop's loss that each distillation recovers, and the step-time overhead of the teacher (search and retrain).
Raw numbers go to distill_results.json beside this script.

    python benchmarks/distill.py [--demos demo-vit demo-clip demo-blip-nlvr] [--ratios 0.5 0.75 0.9] [--seeds 0 1]
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
from upop.run.config import DistillConfig
from upop.models.demo import DEMOS, shapes_dir
from upop.errors import UpopError

VARIANTS = {"upop": "off", "logits": "logits", "features": "features", "both": "both"}
RESULTS = Path(__file__).with_name("distill_results.json")


def run_one(demo: str, ratio: float, seed: int, mode: str, args: argparse.Namespace) -> dict:
    spec = DEMOS[demo]
    cfg = upop.CompressConfig(
        ratio=ratio,
        search=upop.SearchConfig(epochs=args.search_epochs or spec.compress_search_epochs, lr=spec.compress_lr,
                                 seed=seed),
        retrain=upop.RetrainConfig(epochs=args.retrain_epochs or spec.compress_retrain_epochs, lr=spec.compress_lr,
                                   seed=seed),
        distill=DistillConfig(mode=mode, weight=args.weight, temperature=args.temperature, search=args.distill_search))
    t0 = time.perf_counter()
    res = upop.compress(demo, cfg, batch_size=spec.batch_size, latency=False)
    perf = res.report.performance
    return {"metric": res.report.metrics["after"]["primary"], "seconds": time.perf_counter() - t0,
            "search_step_s": perf["search"].get("step_s"), "retrain_step_s": perf["retrain"].get("step_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demos", nargs="*", default=["demo-vit", "demo-clip", "demo-blip-nlvr"])
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.75, 0.9])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--variants", nargs="*", default=["upop", "logits", "features"], choices=list(VARIANTS))
    ap.add_argument("--weight", type=float, default=DistillConfig.weight)
    ap.add_argument("--temperature", type=float, default=DistillConfig.temperature)
    ap.add_argument("--distill-search", action=argparse.BooleanOptionalAction, default=DistillConfig.search)
    ap.add_argument("--search-epochs", type=int, default=None)
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--json", type=Path, default=RESULTS, help="where the raw results go")
    args = ap.parse_args()
    console = Console(stderr=True)
    rows, raw = [], []
    for demo in args.demos:
        spec = DEMOS[demo]
        src = open_model(demo, None)
        base = setup_task(src, None, shapes_dir(), None, spec.batch_size, 0).report_fn(src.model)["primary"]
        for ratio in args.ratios:
            cells: dict[str, list[dict]] = {}
            for variant in args.variants:
                for seed in args.seeds:
                    try:
                        rec = run_one(demo, ratio, seed, VARIANTS[variant], args)
                    except UpopError as exc:  # a task without distillation outputs: said, not hidden
                        rec = {"error": str(exc)}
                    raw.append({"demo": demo, "ratio": ratio, "variant": variant, "seed": seed, "baseline": base,
                                "weight": args.weight, "temperature": args.temperature,
                                "distill_search": args.distill_search, **rec})
                    console.log(f"{demo} p={ratio} {variant} seed {seed}: "
                                + (f"{rec['metric']:.2f} ({rec['seconds']:.0f}s)" if "metric" in rec else rec["error"]))
                    args.json.write_text(json.dumps(raw, indent=2))
                    cells.setdefault(variant, []).append(rec)
            rows.append((demo, ratio, base, cells))
    print_table(rows, args.variants)


def _mean(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return statistics.mean(vals) if vals else None


def print_table(rows: list, variants: list[str]) -> None:
    table = Table(title="distillation on the demo tasks (test split, after retraining; mean ± half-range over seeds; "
                        "recovered: share of UPop's loss to the unpruned model won back; overhead: step time "
                        "search/retrain over UPop's)")
    for col in ("demo", "ratio", "unpruned", *variants, "recovered", "overhead"):
        table.add_column(col, justify="left" if col == "demo" else "right")
    for demo, ratio, base, cells in rows:
        fmt, got = [], {}
        for v in variants:
            vals = [r["metric"] for r in cells.get(v, []) if "metric" in r]
            got[v] = statistics.mean(vals) if vals else None
            fmt.append(f"{got[v]:.2f} ± {(max(vals) - min(vals)) / 2:.2f}" if vals else "–")
        plain, rec, over = got.get("upop"), [], []
        for v in variants:
            if v == "upop" or got.get(v) is None or plain is None:
                continue
            lost = base - plain
            rec.append(f"{v} {(got[v] - plain) / lost:.0%}" if lost > 1e-9 else f"{v} – (UPop lost nothing)")
            ratios = [(_mean(cells[v], k), _mean(cells["upop"], k)) for k in ("search_step_s", "retrain_step_s")]
            over.append(f"{v} " + "/".join(f"{a / b:.2f}×" if a and b else "–" for a, b in ratios))
        table.add_row(demo, f"{ratio}", f"{base:.2f}", *fmt, ", ".join(rec) or "–", ", ".join(over) or "–")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
