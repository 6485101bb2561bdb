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
    """The ``progress(stage, record)`` callback of ``upop.compress``, drawn with rich."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = Console(stderr=True, log_path=False)
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}

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

    def __call__(self, stage: str, rec: dict[str, float]) -> None:
        if self.progress is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=int(rec.get("total", 0)) or None, info="")
        if stage == "search":
            info = f"loss {rec['task_loss']:.3f}  π {rec['pi']:.3f}"
        elif stage == "retrain":
            info = f"loss {rec['loss']:.3f}  lr {rec['lr']:.2e}"
        elif stage == "evaluate":
            info = f"{rec.get('label', '')} split" + (f"  metric {rec['metric']:.2f}" if "metric" in rec else "")
        else:
            info = " ".join(f"{k} {v:.2f}" for k, v in rec.items() if k not in ("step", "total"))
        self.progress.update(self.tasks[stage], completed=int(rec.get("step", 0)), info=info)

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
