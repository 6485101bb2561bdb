"""What distillation costs at real size: step time and peak memory with and without a teacher.

A BLIP-base-size retrieval model with random weights (the config of ``real_size.py``: 224 M parameters) and
synthetic JPEGs; a few search and retrain steps per variant, the same data, batch and seed. ``off`` is plain
UPop; the others distil (``--distill-search``: the teacher runs in both phases). Each variant runs in a fresh
process, so the peak host memory (RSS) of one does not carry into the next. The numbers are about cost, not
accuracy.

    python benchmarks/distill_cost.py [--images 24 --image-size 224 --batch 2 --steps 2 --variants off both]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent


def one(args: argparse.Namespace, variant: str, root: Path) -> dict:
    """One compress run in this process (called in a child): the report's performance record."""
    sys.path.insert(0, str(HERE))
    import upop
    from real_size import write_data, write_model

    data = root / "data"
    if not data.is_dir():
        write_data(data, args.images)
    model_dir = root / "model"
    if not model_dir.is_dir():
        write_model(model_dir, args.image_size)
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=args.steps, update_every=1, lr=1e-5),
                              retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=args.steps, lr=1e-5),
                              distill=upop.DistillConfig(mode=variant, search=variant != "off"))
    res = upop.compress(str(model_dir), cfg, data=data, batch_size=args.batch, eval_limit=4, latency=False,
                        task_options={"workers": 0})
    perf = res.report.performance
    return {"variant": variant, "search_step_s": perf["search"]["step_s"], "retrain_step_s": perf["retrain"]["step_s"],
            "peak_memory": perf["peak_memory"], "seconds": perf["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=["off", "both"], choices=["off", "logits", "features", "both"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args, args.child, args.root)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", variant, "--root", tmp, "--images", str(args.images),
                   "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            Console(stderr=True).log(rows[-1])
    table = Table(title=f"distillation cost: BLIP-base-size retrieval, {args.image_size} px, batch {args.batch}, "
                        f"{args.steps} search + {args.steps} retrain steps")
    for col in ("variant", "search s/step", "retrain s/step", "peak RSS MiB", "peak CUDA MiB"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        mem = r["peak_memory"]
        table.add_row(r["variant"], f"{r['search_step_s']:.2f}", f"{r['retrain_step_s']:.2f}",
                      f"{mem['host_rss_mib']:,.0f}",
                      f"{mem['cuda_max_allocated_mib']:,.0f}" if "cuda_max_allocated_mib" in mem else "–")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
