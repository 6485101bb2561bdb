"""Where a training step's time goes: torch.profiler over steady-state steps of the search and the retrain.

The H100 run of real_size.py searched BLIP-base at 52 images/s, about 27 TFLOP/s or 3 % of the GPU's dense bf16
rate, with only 6-7 % of the time waiting for data. This script answers why, on the next lent GPU: it compresses the same
BLIP-base-size model (random weights, synthetic JPEGs: see real_size.py) and profiles, in each phase, the steps
between two logging windows (the progress callback starts and stops the profiler there, so warm-up and
evaluation stay out). Per phase it prints the wall time per step, the GPU's kernel time per step (its busy
share), kernel launches and the host's waits on the GPU (synchronize calls) per step, and the operators that
take the most GPU and CPU time. ``--trace DIR`` writes a Chrome trace per phase (gzip).

    python benchmarks/step_profile.py [--batch 32 --steps 40 --workers 8 --trace DIR]
    python benchmarks/step_profile.py --dry-run   # the same code on the CPU at toy sizes
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import upop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import write_data, write_model  # noqa: E402  (the BLIP-base-size model and data of that benchmark)

READ = "aten::_local_scalar_dense"  # every .item() / bool(tensor) / .tolist() goes through it (host tensors too)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # the host waiting on the GPU
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")  # name prefixes


def _kernel(e) -> bool:
    """A GPU-side event that is work: not a user annotation (the optimizer's record_function ranges mirrored on
    the GPU span their kernels and the gaps between them)."""
    return e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)


class Window:
    """Profiles each phase from its first progress report to the one at or after ``span`` more steps."""

    def __init__(self, span: int, cuda: bool):
        self.span, self.cuda = span, cuda
        self.active: tuple[str, int, float, profile] | None = None
        self.done: dict[str, tuple[int, float, profile]] = {}

    def __call__(self, phase: str, rec: dict[str, float]) -> None:
        step = int(rec.get("step", 0))
        if self.active is None and phase not in self.done and phase in ("search", "retrain"):
            prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else []))
            self._sync()
            prof.start()
            self.active = (phase, step, time.perf_counter(), prof)
        elif self.active is not None and self.active[0] == phase and step >= self.active[1] + self.span:
            name, first, t0, prof = self.active
            self._sync()
            prof.stop()
            self.done[name] = (step - first, time.perf_counter() - t0, prof)
            self.active = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def summary(steps: int, wall: float, prof: profile) -> dict[str, float]:
    events = prof.events()
    gpu_us = sum(e.device_time_total for e in events if _kernel(e))
    count = {name: sum(1 for e in events if e.name.startswith(names))
             for name, names in (("launches", LAUNCHES), ("syncs", SYNCS), ("reads", (READ,)))}
    count["syncs"] = max(0, count["syncs"] - 1)  # the window's own closing synchronize
    return {"steps": steps, "wall_ms": 1e3 * wall / steps, "gpu_ms": gpu_us / 1e3 / steps,
            "busy": gpu_us / 1e6 / wall, **{k: v / steps for k, v in count.items()}}


def top(prof: profile, key: str, n: int) -> list[tuple[str, float, int]]:
    """The ``n`` operators with the most self time on ``key`` ("cpu" or "device"), in ms over the window."""
    attr = "self_cpu_time_total" if key == "cpu" else "self_device_time_total"
    rows = [(e.key, getattr(e, attr, 0.0) / 1e3, e.count) for e in prof.key_averages()
            if not getattr(e, "is_user_annotation", False)]
    return sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])[:n]


def report(console: Console, done: dict[str, tuple[int, float, profile]], n: int, title: str,
           unprofiled: dict[str, float]) -> None:
    table = Table(title=title)
    for col in ("phase", "steps", "wall ms/step", "unprofiled ms/step (whole phase)", "GPU kernel ms/step", "GPU busy",
                "kernel launches/step", "host waits on the GPU/step", "item() calls/step (host tensors too)"):
        table.add_column(col, justify="right")
    for phase, (steps, wall, prof) in done.items():
        s = summary(steps, wall, prof)
        whole = f"{1e3 * unprofiled[phase]:.1f}" if phase in unprofiled else "-"
        table.add_row(phase, str(steps), f"{s['wall_ms']:.1f}", whole, f"{s['gpu_ms']:.1f}", f"{100 * s['busy']:.0f} %",
                      f"{s['launches']:.0f}", f"{s['syncs']:.1f}", f"{s['reads']:.1f}")
    console.print(table)
    for phase, (steps, _wall, prof) in done.items():
        for key in ("device", "cpu"):
            rows = top(prof, key, n)
            if not rows:
                continue
            t = Table(title=f"{phase}: most {key} self time over {steps} steps")
            t.add_column("operator")
            t.add_column("ms", justify="right")
            t.add_column("calls", justify="right")
            for name, ms, count in rows:
                t.add_row(name[:90], f"{ms:.1f}", str(count))
            console.print(t)


def save_traces(done: dict[str, tuple[int, float, profile]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for phase, (_steps, _wall, prof) in done.items():
        raw = folder / f"{phase}.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(folder / f"{phase}.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="search steps and retrain steps")
    ap.add_argument("--update-every", type=int, default=50, help="mask update interval (a real run's, not 1)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace", type=Path, help="write a gzipped Chrome trace per phase here")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU at toy sizes (tests this script)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA GPU here: this script is for a lent GPU machine (--dry-run runs it on the CPU)")
    size, steps, batch = (64, 4, 2) if args.dry_run else (384, args.steps, args.batch)
    # a logging window is 10 steps on CUDA and 1 on the CPU: profile the windows after the first
    window = Window(span=20 if cuda else 2, cuda=cuda)
    first = 10 if cuda else 1
    if steps < first + window.span:
        raise SystemExit(f"--steps must be at least {first + window.span}: the profile spans steps {first} to "
                         f"{first + window.span}")
    unprofiled: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data = write_data(root / "data", 10 if args.dry_run else args.images)
            model_dir, _params = write_model(root / "model", size, **({"hidden": 64, "layers": 2, "heads": 2}
                                                                      if args.dry_run else {}))
            cfg = upop.CompressConfig(
                ratio=0.5, device="cuda" if cuda else "cpu",
                search=upop.SearchConfig(steps=steps, update_every=min(args.update_every, steps), lr=1e-5),
                retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=steps, lr=1e-5))
            res = upop.compress(str(model_dir), cfg, data=data, batch_size=batch, eval_limit=4, progress=window,
                                latency=False, task_options={"workers": 0 if args.dry_run else args.workers})
            unprofiled = {phase: res.report.performance[phase]["step_s"] for phase in ("search", "retrain")}
    finally:  # a run that fails after the search still shows the search's profile
        where = torch.cuda.get_device_name(0) if cuda else "CPU dry run"
        report(Console(width=200), window.done, args.top,
               f"BLIP-base-size ITR training steps at {size} px, batch {batch}, mask update every "
               f"{min(args.update_every, steps)} steps, {where} (torch {torch.__version__})", unprofiled)
        if args.trace:
            save_traces(window.done, args.trace)


if __name__ == "__main__":
    main()
