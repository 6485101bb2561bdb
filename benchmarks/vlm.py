"""UPop over both towers of a decoder VLM vs the language model alone vs uniform magnitude, on demo-smolvlm.

For each total ratio p (0.3, 0.5, 0.7 by default) and seed:
  both            UPop, one ranking over the vision tower and the language model (``--towers`` unset)
  language-only   UPop over the language model alone (``--towers language``, what an LM-only pruner does), at the
                  ratio that removes the same total cost: p × cost(both towers) / cost(language model)
  uniform         every module loses p of its units, smallest L1 weight first (``method uniform-magnitude``)
Each arm: the same search and retrain budget (the demo's), then VQA accuracy (test) and caption CIDEr (test) of
the slim model, its parameters and FLOPs, and the decode path's latency rows of the report (image encode,
prefill, decode step: ONNX Runtime CPU where installed). The table gives mean ± half-range over seeds; a
difference smaller than the spread decides nothing.

    python benchmarks/vlm.py [--ratios 0.3 0.5 0.7] [--seeds 0 1] [--arms both language-only uniform]
        [--search-epochs N] [--retrain-epochs N] [--eval-limit N] [--json FILE]

The SmolVLM-256M-size half (parameters, FLOPs, prefill/decode latency original vs slim 0.5) is
``benchmarks/vlm_latency.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import upop
from upop.api import open_model, setup_task
from upop.models.demo import DEMOS, shapes_dir

DEMO = "demo-smolvlm"
ARMS = ("both", "language-only", "uniform")


def tower_costs(model: Any, adapter: Any, granularity: str = "dim") -> dict[str, float]:
    """Each tower's compressible cost: the sum over its modules of unit cost × units."""
    out: dict[str, float] = {}
    for spec in adapter.modules(model):
        out[spec.tower] = out.get(spec.tower, 0.0) + spec.unit_cost(model, granularity) * spec.num_units(granularity)
    return out


def arm_config(arm: str, ratio: float, seed: int, costs: dict[str, float], args: argparse.Namespace) -> Any:
    """The run of one arm, or None when its ratio cannot be reached (LM-only beyond the whole LM)."""
    spec = DEMOS[DEMO]
    towers, method, p = None, "upop", ratio
    if arm == "language-only":
        towers, p = "language", ratio * sum(costs.values()) / costs["language"]
    elif arm == "uniform":
        method = "uniform-magnitude"
    if not 0 < p < 1:
        return None
    search = upop.SearchConfig(epochs=args.search_epochs or spec.compress_search_epochs, lr=spec.compress_lr,
                               seed=seed, method=method, towers=towers)
    retrain = upop.RetrainConfig(epochs=args.retrain_epochs or spec.compress_retrain_epochs, lr=spec.compress_lr,
                                 seed=seed)
    return upop.CompressConfig(ratio=p, search=search, retrain=retrain)


@functools.cache
def caption_task() -> Any:
    """The demo's caption task, built once (its records and processor serve every arm's evaluation)."""
    src = open_model(DEMO, "caption")
    return setup_task(src, "caption", shapes_dir(), None, DEMOS[DEMO].batch_size, 0).task


def caption_cider(model: Any, limit: int | None) -> float:
    """The slim model's caption CIDEr on the test split (the demo trains on VQA and captions alike)."""
    return caption_task().evaluate(model, "test", limit)["primary"]


def decode_latency(report: Any) -> dict[str, float]:
    """The report's stage rows (image encode, prefill, decode step) after slimming, by stage and runtime."""
    out = {}
    for row in report.latency or []:
        if row.get("stage"):
            out[f"{row['stage']} {row['runtime']} ms"] = row["after_ms"]
    return out


def run_arm(arm: str, ratio: float, seed: int, costs: dict[str, float], args: argparse.Namespace) -> dict[str, Any] | None:
    cfg = arm_config(arm, ratio, seed, costs, args)
    if cfg is None:
        return None
    t0 = time.perf_counter()
    res = upop.compress(DEMO, cfg, batch_size=DEMOS[DEMO].batch_size, eval_limit=args.eval_limit)
    rep = res.report
    return {"arm": arm, "ratio": ratio, "run_ratio": cfg.ratio, "seed": seed,
            "vqa_acc": rep.metrics["after"]["primary"], "cider": caption_cider(res.model, args.eval_limit),
            "params": rep.params["after"]["total"], "flops": rep.flops["after"]["total"],
            **decode_latency(rep), "seconds": time.perf_counter() - t0}


def _cell(rows: list[dict[str, Any]], key: str, fmt: str = "{:.2f}") -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "–"
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format((max(vals) - min(vals)) / 2)}"


def print_table(raw: list[dict[str, Any]], base: dict[str, Any], args: argparse.Namespace) -> None:
    lat = sorted({k for r in raw for k in r if k.endswith(" ms")})
    table = Table(title=f"{DEMO}: UPop over both towers vs LM-only vs uniform magnitude (test split; mean ± half-range "
                        f"over seeds {args.seeds})")
    for col in ("ratio", "arm", "VQA acc", "CIDEr", "params M", "GFLOPs", *lat):
        table.add_column(col, justify="left" if col == "arm" else "right")
    table.add_row("0", "unpruned", f"{base['vqa_acc']:.2f}", f"{base['cider']:.2f}", f"{base['params'] / 1e6:.3f}",
                  f"{base['flops'] / 1e9:.4f}", *("–" for _ in lat))
    for ratio in args.ratios:
        for arm in args.arms:
            rows = [r for r in raw if r["ratio"] == ratio and r["arm"] == arm]
            if not rows:
                table.add_row(f"{ratio:g}", arm, "not reachable", *("–" for _ in range(3 + len(lat))))
                continue
            table.add_row(f"{ratio:g}", arm, _cell(rows, "vqa_acc"), _cell(rows, "cider"),
                          f"{statistics.mean(r['params'] for r in rows) / 1e6:.3f}",
                          f"{statistics.mean(r['flops'] for r in rows) / 1e9:.4f}", *(_cell(rows, k) for k in lat))
    Console(width=200).print(table)


def baseline(limit: int | None) -> tuple[dict[str, Any], dict[str, float]]:
    from upop.pruning.flops import flops_per_tower, params_per_tower

    import torch

    src = open_model(DEMO, None)
    ts = setup_task(src, None, shapes_dir(), None, DEMOS[DEMO].batch_size, 0)
    example = src.adapter.example_inputs(src.model, batch_size=1, generator=torch.Generator().manual_seed(0))
    base = {"vqa_acc": ts.task.evaluate(src.model, "test", limit)["primary"],
            "cider": caption_cider(src.model, limit), "params": params_per_tower(src.model, src.adapter)["total"],
            "flops": flops_per_tower(src.model, src.adapter, example)["total"]}
    return base, tower_costs(src.model, src.adapter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    ap.add_argument("--search-epochs", type=int, default=None)
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most N test records")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = ap.parse_args()
    log = Console(stderr=True)
    base, costs = baseline(args.eval_limit)
    log.log(f"unpruned: VQA {base['vqa_acc']:.2f}, CIDEr {base['cider']:.2f}; tower costs {costs}")
    raw: list[dict[str, Any]] = []
    for ratio in args.ratios:
        for arm in args.arms:
            for seed in args.seeds:
                row = run_arm(arm, ratio, seed, costs, args)
                if row is None:
                    log.log(f"p={ratio} {arm}: not reachable (the language model alone holds too little cost)")
                    break
                raw.append(row)
                log.log(f"p={ratio} {arm} seed {seed}: VQA {row['vqa_acc']:.2f}, CIDEr {row['cider']:.2f} "
                        f"({row['seconds']:.0f} s)")
                if args.json:
                    args.json.write_text(json.dumps({"baseline": base, "tower_costs": costs, "rows": raw}, indent=2))
    print_table(raw, base, args)


if __name__ == "__main__":
    main()
