"""Progress bars with ETA for search and retrain; silent under --quiet or off a terminal (logs, pipes, CI)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def interactive(quiet: bool, as_json: bool = False) -> bool:
    """Bars are drawn on stderr, and only for a person watching: stderr and stdout both terminals (under
    ``--json`` stdout goes to a program, and stderr alone decides)."""
    return not quiet and sys.stderr.isatty() and (as_json or sys.stdout.isatty())


class Reporter:
    """The ``progress(stage, record)`` callback of ``upop.compress``: bars drawn with rich on a terminal;
    with ``lines`` (a log: a pipe, CI, a batch job) a plain line on stderr at most every ``every_s`` seconds
    per stage and at its last step, so a log shows progress without bars."""

    def __init__(self, enabled: bool, lines: bool = False, every_s: float = 30.0):
        self.enabled, self.lines, self.every_s = enabled, lines and not enabled, every_s
        self.console = Console(stderr=True, log_path=False)
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def __enter__(self) -> "Reporter":
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    @staticmethod
    def info(stage: str, rec: dict[str, float]) -> str:
        if stage == "search":
            info = f"loss {rec['task_loss']:.3f}  π {rec['pi']:.3f}"
        elif stage == "retrain":
            info = f"loss {rec['loss']:.3f}  lr {rec['lr']:.2e}"
        elif stage == "evaluate":
            return f"{rec.get('label', '')} split" + (f"  metric {rec['metric']:.2f}" if "metric" in rec else "")
        else:
            return " ".join(f"{k} {v:.2f}" for k, v in rec.items() if k not in ("step", "total"))
        if "images_per_s" in rec:  # what the GPU is fed, and how much of the time it waits for data
            info += f"  {rec['images_per_s']:.1f} img/s  data wait {100 * rec['data_wait']:.0f}%"
        return info

    def __call__(self, stage: str, rec: dict[str, float]) -> None:
        if self.lines:
            self._line(stage, rec)
        if self.progress is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=int(rec.get("total", 0)) or None, info="")
        self.progress.update(self.tasks[stage], completed=int(rec.get("step", 0)), info=self.info(stage, rec))

    def _line(self, stage: str, rec: dict[str, float]) -> None:
        import time

        now = time.monotonic()
        step, total = int(rec.get("step", 0)), int(rec.get("total", 0))
        start = self._start.setdefault(stage, now)
        if step < total and now - self._last.get(stage, start) < self.every_s:
            return
        self._last[stage] = now
        eta = f"  eta {int((now - start) / step * (total - step))} s" if 0 < step < total else ""
        self.console.print(f"{stage} {step}/{total}  {self.info(stage, rec)}{eta}", soft_wrap=True, markup=False,
                           highlight=False)

    @contextmanager
    def status(self, text: str):
        if self.progress is not None:
            task = self.progress.add_task(text, total=None, info="")
            try:
                yield
            finally:
                self.progress.update(task, total=1, completed=1)
        else:
            yield
