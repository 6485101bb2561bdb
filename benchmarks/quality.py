"""A quality benchmark that can decide: upop's defaults against their alternatives, with their noise.

The demos decide nothing smaller than a few points: one demo-vit test item is 0.42 points, runs use two
seeds, and the demo models are not trained to convergence. This benchmark builds a larger shapes set and
teachers trained to convergence, then runs each choice both ways over several seeds:

1. **Data**: the shapes set at ``--test`` images per test split (1,000 by default: one classification
   item is 0.1 point, one image-to-text retrieval query 0.1 point, one text-to-image query 0.03 point),
   ``--train`` training scenes and ``--train-per-class`` classification images per class.
2. **Teachers**: demo-vit's and demo-blip's architectures trained from scratch on that set in stages of
   ``--stage-epochs`` epochs (each stage continues the last), until a stage gains less than
   ``--converged`` points on val or ``--max-stages`` is reached. The loss curve (every 100 steps) and the
   val metric after each stage are recorded: the teacher is converged by that record, not assumed.
3. **Choices**: ``upop compress TEACHER --ratio R`` with the default and with each alternative (below), one
   run per seed (``--seeds``, at least 3), everything else equal. Per cell: the test metric's mean and
   its 95 % interval over seeds (t distribution). Per choice: the paired difference (same seed, same
   test set: the test-set sampling noise is common to both sides and cancels) with its 95 % interval,
   and a "decides" column: ``keep`` when the alternative is worse beyond the interval, ``change`` when it
   is better beyond it, ``no`` when the interval holds 0 (the difference is within the noise).

    python benchmarks/quality.py [--families vit blip] [--seeds 0 1 2] [--choices search-lr-schedule ...]
        [--json benchmarks/quality_results.json]
    python benchmarks/quality.py --dry-run      # tiny sizes: the code path end to end in a few minutes

Needs no network. Long: a teacher, then 2 runs per seed per choice (hours on 2 CPU cores at the default
sizes). Prints the tables; decides nothing on wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from upop.datasets.shapes import shapes
from upop.models.demo import train_demo


@dataclass(frozen=True)
class Choice:
    """A default and its alternative, as ``upop compress`` flags; ``families``: where the choice applies."""

    name: str
    default: tuple[str, ...]
    alternative: tuple[str, ...]
    families: tuple[str, ...]


CHOICES = [
    Choice("search-lr-schedule", ("--search-lr-schedule", "constant"), ("--search-lr-schedule", "cosine"),
           ("vit", "blip")),
    Choice("distill", ("--distill", "off"), ("--distill", "logits"), ("vit", "blip")),
    Choice("momentum", ("--no-momentum",), ("--momentum",), ("blip",)),
    Choice("rerank", ("--rerank", "logit"), ("--rerank", "prob"), ("blip",)),
    Choice("k-test", ("--k-test", "16"), ("--k-test", "64"), ("blip",)),
]
TEACHERS = {"vit": "demo-vit", "blip": "demo-blip"}
#: two-sided 95 % quantiles of Student's t by degrees of freedom (beyond 30: the normal's)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    if df <= 0:
        return math.inf
    return _T95.get(df) or next((v for k, v in sorted(_T95.items()) if k >= df), 1.96)


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % interval of the mean); an interval of one value is infinite."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.inf
    return mean, t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def verdict(diffs: list[float]) -> str:
    """Alternative minus default, paired by seed: does it exceed its noise, and which way."""
    mean, half = interval(diffs)
    if mean - half > 0:
        return "change"
    if mean + half < 0:
        return "keep"
    return "no"


@dataclass
class Teacher:
    family: str
    folder: Path
    stages: list[dict] = field(default_factory=list)


def train_teacher(family: str, data: Path, root: Path, args: argparse.Namespace, console: Console) -> Teacher:
    """Stages of ``stage_epochs`` until val gains less than ``converged`` points; the loss curve recorded."""
    teacher = Teacher(family, root / f"teacher-{family}")
    prev: Path | None = None
    best = -math.inf
    for stage in range(args.max_stages):
        losses: list[tuple[int, float]] = []

        def log(line: str) -> None:
            m = re.search(r"step (\d+)/\d+ loss ([0-9.]+)", line)
            if m:
                losses.append((int(m.group(1)), float(m.group(2))))

        out = root / f"teacher-{family}-stage{stage}"
        summary = train_demo(TEACHERS[family], out_dir=out, data_dir=data, epochs=args.stage_epochs,
                             init_from=prev, log=log)
        val = float(summary["best_val"])
        teacher.stages.append({"stage": stage, "epochs": args.stage_epochs, "val": val,
                               "test": summary["test"].get("primary"), "loss_curve": losses})
        console.print(f"teacher {family} stage {stage}: val {val:.2f}, test {summary['test'].get('primary', 0):.2f}")
        prev, gain, best = out, val - best, max(best, val)
        if gain < args.converged:
            break
    teacher.folder = prev  # type: ignore[assignment]
    return teacher


def compress(teacher: Path, data: Path, out: Path, seed: int, flags: tuple[str, ...], args: argparse.Namespace) -> float:
    """The test primary metric of one ``upop compress`` run (the CLI, as a user runs it)."""
    cmd = [sys.executable, "-m", "upop_cli", "compress", "--model", str(teacher), "--data", str(data),
           "--ratio", str(args.ratio), "--seed", str(seed), "--out", str(out), "--quiet", "--no-latency",
           "--overwrite", *flags]
    if args.search_epochs:
        cmd += ["--search-epochs", str(args.search_epochs)]
    if args.retrain_epochs:
        cmd += ["--retrain-epochs", str(args.retrain_epochs)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    subprocess.run(cmd, check=True)
    report = json.loads((out / "report.json").read_text())
    return float(report["metrics"]["after"]["primary"])


def run_choices(teacher: Teacher, data: Path, root: Path, args: argparse.Namespace, console: Console) -> list[dict]:
    rows = []
    done: dict[tuple[str, ...], dict[int, float]] = {}  # one default run per seed serves every choice sharing it
    for choice in CHOICES:
        if teacher.family not in choice.families or (args.choices and choice.name not in args.choices):
            continue
        sides = {}
        for label, flags in (("default", choice.default), ("alternative", choice.alternative)):
            cached = done.setdefault(flags, {})
            for seed in args.seeds:
                if seed not in cached:
                    out = root / f"{teacher.family}-{'-'.join(f.strip('-') for f in flags)}-s{seed}"
                    cached[seed] = compress(teacher.folder, data, out, seed, flags, args)
                    console.print(f"{teacher.family} {choice.name} {label} seed {seed}: {cached[seed]:.2f}")
            sides[label] = [cached[s] for s in args.seeds]
        diffs = [a - d for a, d in zip(sides["alternative"], sides["default"])]
        rows.append({"family": teacher.family, "choice": choice.name, "default": " ".join(choice.default),
                     "alternative": " ".join(choice.alternative), "seeds": list(args.seeds),
                     "default_runs": sides["default"], "alternative_runs": sides["alternative"],
                     "diff": interval(diffs), "decides": verdict(diffs)})
    return rows


def _cell(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:.2f} ± {half:.2f}" if math.isfinite(half) else f"{mean:.2f}"


def print_tables(teachers: list[Teacher], rows: list[dict], args: argparse.Namespace, console: Console) -> None:
    t = Table(title="Teachers (trained to convergence on the larger shapes set)")
    for c in ("family", "stages", "epochs", "val per stage", "test"):
        t.add_column(c)
    for te in teachers:
        t.add_row(te.family, str(len(te.stages)), str(sum(s["epochs"] for s in te.stages)),
                  " → ".join(f"{s['val']:.1f}" for s in te.stages), f"{te.stages[-1]['test']:.2f}")
    console.print(t)
    t = Table(title=f"Choices at ratio {args.ratio}: test metric, mean ± 95 % interval over seeds {args.seeds}; "
                    f"the difference is paired by seed")
    for c in ("family", "choice", "default", "mean", "alternative", "mean ", "alt − default", "decides"):
        t.add_column(c)
    for r in rows:
        mean, half = r["diff"]
        t.add_row(r["family"], r["choice"], r["default"], _cell(r["default_runs"]), r["alternative"],
                  _cell(r["alternative_runs"]), f"{mean:+.2f} ± {half:.2f}", r["decides"])
    console.print(t)
    console.print("decides: keep = the alternative is worse beyond the interval; change = better beyond it; "
                  "no = within the noise")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=["vit", "blip"], choices=list(TEACHERS))
    ap.add_argument("--choices", nargs="*", default=None, choices=[c.name for c in CHOICES])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--train", type=int, default=3000, help="training scenes (retrieval, VQA)")
    ap.add_argument("--train-per-class", type=int, default=250, help="classification training images per class")
    ap.add_argument("--test", type=int, default=1000, help="test images (classification: rounded up to 12 classes)")
    ap.add_argument("--stage-epochs", type=int, default=20)
    ap.add_argument("--max-stages", type=int, default=5)
    ap.add_argument("--converged", type=float, default=0.5, help="val points a stage must gain to go on")
    ap.add_argument("--search-epochs", type=int, default=None)
    ap.add_argument("--retrain-epochs", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the data, teachers and runs here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, few steps: the code path only")
    args = ap.parse_args()
    if args.dry_run:
        args.train, args.train_per_class, args.test = 48, 4, 24
        args.stage_epochs, args.max_stages, args.max_steps = 1, 2, 2
        args.seeds = args.seeds[:2]
    if len(args.seeds) < 3 and not args.dry_run:
        ap.error("at least 3 seeds: an interval over 2 runs is too wide to decide anything")
    console = Console(width=170)
    root = args.work or Path(tempfile.mkdtemp(prefix="upop-quality-"))
    per_class = -(-args.test // 12)
    data = shapes(root / "data", train=args.train, val=max(12, args.test // 5), test=args.test, seed=1234,
                  classification_per_class=(args.train_per_class, max(1, per_class // 5), per_class))
    teachers, rows = [], []
    for family in args.families:
        teacher = train_teacher(family, data, root, args, console)
        teachers.append(teacher)
        rows += run_choices(teacher, data, root, args, console)
    print_tables(teachers, rows, args, console)
    if args.json:
        args.json.write_text(json.dumps({"teachers": [t.__dict__ | {"folder": str(t.folder)} for t in teachers],
                                         "rows": rows, "settings": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))


if __name__ == "__main__":
    main()
