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
3. **Choices**: ``upop compress TEACHER --ratio R`` once per seed (``--seeds``, at least 3) with every
   default flag spelt out, and once per seed and choice with that one flag changed, everything else equal.
   A choice that only changes the scoring (the re-ranking rule and depth) re-scores the default run's slim
   model instead of training again. Per cell: the test metric's mean and
   its 95 % interval over seeds (t distribution). Per choice: the paired difference (same seed, same
   test set: the test-set sampling noise is common to both sides and cancels) with its 95 % interval,
   and a "decides" column: ``keep`` when the alternative is worse beyond the interval, ``change`` when it
   is better beyond it, ``no`` when the interval holds 0 (the difference is within the noise).

    python benchmarks/quality.py [--families vit blip] [--seeds 0 1 2] [--choices search-lr-schedule ...]
        [--json benchmarks/quality_results.json]
    python benchmarks/quality.py --dry-run      # tiny sizes: the code path end to end in a few minutes

With ``--work DIR`` a stopped run goes on where it stopped (``DIR/state.json``: teacher stages, runs).
Needs no network. Long: a teacher, then 1 + (training choices) runs per seed (hours on 2 CPU cores at the default
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
from upop.models.demo import DEMOS, train_demo


@dataclass(frozen=True)
class Choice:
    """A default and its alternative, as ``upop compress`` flags; ``families``: where the choice applies.

    ``at_eval``: the choice only changes how the model is scored (the task option, its default value and its
    alternative value), so its alternative re-scores the default run's slim model instead of training again.
    Exact when the retrain has one epoch (nothing is selected on val), as demo-blip's budget has."""

    name: str
    default: tuple[str, ...]
    alternative: tuple[str, ...]
    families: tuple[str, ...]
    at_eval: tuple[str, object, object] | None = None


CHOICES = [
    Choice("search-lr-schedule", ("--search-lr-schedule", "constant"), ("--search-lr-schedule", "cosine"),
           ("vit", "blip")),
    Choice("distill", ("--distill", "off"), ("--distill", "logits"), ("vit", "blip")),
    Choice("cost-weights", ("--cost-weights", "true"), ("--cost-weights", "paper"), ("blip",)),
    Choice("momentum", ("--momentum",), ("--no-momentum",), ("blip",)),
    Choice("rerank", ("--rerank", "logit"), ("--rerank", "prob"), ("blip",), at_eval=("rerank", "logit", "prob")),
    Choice("k-test", ("--k-test", "16"), ("--k-test", "64"), ("blip",), at_eval=("k_test", 16, 64)),
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


class State:
    """What a run under ``--work`` has finished (teacher stages, compress runs, re-scorings), kept in
    ``state.json`` there, so a stopped benchmark goes on where it stopped instead of starting again."""

    def __init__(self, root: Path, settings: dict[str, str]) -> None:
        self.path = root / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if self.data.get("settings", settings) != settings:
            raise SystemExit(f"{self.path} was written with other settings; use another --work folder")
        self.data.setdefault("settings", settings)

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def train_teacher(family: str, data: Path, root: Path, args: argparse.Namespace, console: Console,
                  state: State) -> Teacher:
    """Stages of ``stage_epochs`` until val gains less than ``converged`` points; the loss curve recorded."""
    teacher = Teacher(family, root / f"teacher-{family}")
    prev: Path | None = None
    best = -math.inf
    for stage in range(max_stages(args.max_stages, family)):
        out = root / f"teacher-{family}-stage{stage}"
        record = state.get(f"teacher-{family}-{stage}")
        if record is None:
            losses: list[tuple[int, float]] = []

            def log(line: str) -> None:
                m = re.search(r"step (\d+)/\d+ loss ([0-9.]+)", line)
                if m:
                    losses.append((int(m.group(1)), float(m.group(2))))

            summary = train_demo(TEACHERS[family], out_dir=out, data_dir=data, epochs=args.stage_epochs,
                                 init_from=prev, log=log)
            record = {"stage": stage, "epochs": args.stage_epochs, "val": float(summary["best_val"]),
                      "test": summary["test"].get("primary"), "loss_curve": losses}
            state.put(f"teacher-{family}-{stage}", record)
        teacher.stages.append(record)
        console.print(f"teacher {family} stage {stage}: val {record['val']:.2f}, test {record['test'] or 0:.2f}")
        prev, gain, best = out, record["val"] - best, max(best, record["val"])
        if gain < args.converged:
            break
    teacher.folder = prev  # type: ignore[assignment]
    return teacher


def max_stages(spec: list[str], family: str) -> int:
    """``--max-stages 5`` for every family, or per family: ``--max-stages 5 blip=2`` (the last plain number
    for the others)."""
    plain = [int(v) for v in spec if "=" not in v] or [5]
    own = {k: int(v) for k, v in (item.split("=", 1) for item in spec if "=" in item)}
    return own.get(family, plain[-1])


def compress(family: str, teacher: Path, data: Path, out: Path, seed: int, flags: tuple[str, ...],
             args: argparse.Namespace) -> float:
    """The test primary metric of one ``upop compress`` run (the CLI, as a user runs it), with the budget
    ``upop compress`` gives the family's demo (epochs, learning rate, batch, no augmentation) unless told."""
    spec = DEMOS[TEACHERS[family]]
    cmd = [sys.executable, "-m", "upop_cli", "compress", "--model", str(teacher), "--data", str(data),
           "--ratio", str(args.ratio), "--seed", str(seed), "--out", str(out), "--quiet", "--no-latency",
           "--overwrite", "--search-epochs", str(args.search_epochs or spec.compress_search_epochs),
           "--retrain-epochs", str(args.retrain_epochs or spec.compress_retrain_epochs),
           "--lr", str(spec.compress_lr), "--batch-size", str(spec.batch_size), "--augment", "none", *flags]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    subprocess.run(cmd, check=True)
    report = json.loads((out / "report.json").read_text())
    return float(report["metrics"]["after"]["primary"])


def rescore(slim: Path, data: Path, seed: int, options: dict[str, object]) -> float:
    """The test primary metric of a compress run's slim model, scored with these task options."""
    from upop.run.pipeline import open_model, setup_task

    src = open_model(slim)
    ts = setup_task(src, None, data, None, 64, seed, **options)
    return float(ts.report_fn(src.model)["primary"])


def run_choices(teacher: Teacher, data: Path, root: Path, args: argparse.Namespace, console: Console,
                state: State) -> list[dict]:
    """Every choice's alternative against one shared default run per seed: the default run carries every
    default flag, an alternative run changes one of them."""
    choices = [c for c in CHOICES if teacher.family in c.families and (not args.choices or c.name in args.choices)]
    base = [flag for c in choices for flag in c.default]

    def run(name: str, flags: list[str], seed: int) -> float:
        key = f"{teacher.family}-{name}-s{seed}"
        done = state.get(key)
        # another --choices set (the default run's flags differ) or another teacher (more stages): run again
        if done is None or done["flags"] != flags or done.get("teacher") != str(teacher.folder):
            metric = compress(teacher.family, teacher.folder, data, root / key, seed, tuple(flags), args)
            done = {"flags": flags, "teacher": str(teacher.folder), "metric": metric}
            state.put(key, done)
        console.print(f"{teacher.family} {name} seed {seed}: {done['metric']:.2f}")
        return done["metric"]

    defaults = [run("default", base, seed) for seed in args.seeds]
    rows = []
    for choice in choices:
        alternative = []
        for seed in args.seeds:
            if choice.at_eval:
                key = f"{teacher.family}-{choice.name}-rescored-s{seed}"
                done = state.get(key)
                if done is None or done.get("teacher") != str(teacher.folder):
                    # the default run's scoring options, this one changed
                    options = {c.at_eval[0]: c.at_eval[2 if c is choice else 1] for c in choices if c.at_eval}
                    metric = rescore(root / f"{teacher.family}-default-s{seed}", data, seed, options)
                    done = {"teacher": str(teacher.folder), "metric": metric}
                    state.put(key, done)
                console.print(f"{teacher.family} {choice.name} rescored seed {seed}: {done['metric']:.2f}")
                alternative.append(done["metric"])
            else:
                flags = [f for c in choices for f in (c.alternative if c is choice else c.default)]
                alternative.append(run(choice.name, flags, seed))
        diffs = [a - d for a, d in zip(alternative, defaults)]
        rows.append({"family": teacher.family, "choice": choice.name, "default": " ".join(choice.default),
                     "alternative": " ".join(choice.alternative), "seeds": list(args.seeds),
                     "rescored": choice.at_eval is not None, "default_runs": defaults,
                     "alternative_runs": alternative, "diff": interval(diffs), "decides": verdict(diffs)})
    return rows


def _cell(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:.2f} ± {half:.2f}" if math.isfinite(half) else f"{mean:.2f}"


def print_tables(teachers: list[Teacher], rows: list[dict], args: argparse.Namespace, console: Console) -> None:
    t = Table(title=f"Teachers on the larger shapes set (stages until val gains < {args.converged} points, or the "
                    "stage cap)")
    for c in ("family", "stages", "epochs", "val per stage", "test", "converged"):
        t.add_column(c)
    for te in teachers:
        vals = [s["val"] for s in te.stages]
        done = len(vals) > 1 and vals[-1] - vals[-2] < args.converged
        t.add_row(te.family, str(len(te.stages)), str(sum(s["epochs"] for s in te.stages)),
                  " → ".join(f"{v:.1f}" for v in vals), f"{te.stages[-1]['test']:.2f}",
                  "yes" if done else f"no: the last stage gained {vals[-1] - vals[-2]:.2f}" if len(vals) > 1 else "no")
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
    ap.add_argument("--max-stages", nargs="*", default=["5"], help="stages at most: N, or FAMILY=N (e.g. 5 blip=2)")
    ap.add_argument("--converged", type=float, default=0.5, help="val points a stage must gain to go on")
    ap.add_argument("--search-epochs", type=int, default=None, help="default: the family's demo budget")
    ap.add_argument("--retrain-epochs", type=int, default=None, help="default: the family's demo budget")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the data, teachers and runs here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, few steps: the code path only")
    args = ap.parse_args()
    if args.dry_run:
        args.train, args.train_per_class, args.test = 48, 4, 24
        args.stage_epochs, args.max_stages, args.max_steps = 1, ["2"], 2
        args.seeds = args.seeds[:2]
    if len(args.seeds) < 3 and not args.dry_run:
        ap.error("at least 3 seeds: an interval over 2 runs is too wide to decide anything")
    console = Console(width=170)
    root = args.work or Path(tempfile.mkdtemp(prefix="upop-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    # what the finished work depends on (more stages or another threshold reuse the stages already trained)
    state = State(root, {k: str(v) for k, v in vars(args).items()
                         if k not in ("work", "json", "families", "choices", "max_stages", "converged")})
    per_class = -(-args.test // 12)
    data = root / "data"
    if not (data / ".complete").is_file():
        shapes(data, train=args.train, val=max(12, args.test // 5), test=args.test, seed=1234,
               classification_per_class=(args.train_per_class, max(1, per_class // 5), per_class))
        (data / ".complete").write_text("")
    teachers, rows = [], []
    for family in args.families:
        teacher = train_teacher(family, data, root, args, console, state)
        teachers.append(teacher)
        rows += run_choices(teacher, data, root, args, console, state)
    print_tables(teachers, rows, args, console)
    if args.json:
        args.json.write_text(json.dumps({"teachers": [t.__dict__ | {"folder": str(t.folder)} for t in teachers],
                                         "rows": rows, "settings": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))


if __name__ == "__main__":
    main()
