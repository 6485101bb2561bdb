"""Ctrl-C outside a command body: one line and exit 130 (nothing has been written yet, so nothing is lost).

Kept free of heavy imports: it is installed before torch or typer is imported.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_INTERRUPTED = 130
_said = False


def leave(signum: int, frame: Any) -> None:
    global _said
    if not _said:
        _said = True
        try:
            os.write(2, b"interrupted\n")
        except OSError:
            pass
    os._exit(EXIT_INTERRUPTED)


def said() -> None:
    """The line was printed (by the command's own handler): a second Ctrl-C in the teardown stays silent."""
    global _said
    _said = True


@contextmanager
def armed() -> Iterator[None]:
    """Inside a command body Ctrl-C is Python's ``KeyboardInterrupt``, so a run can save its state."""
    leaving = signal.getsignal(signal.SIGINT)  # upop_cli's own first-lines handler, marked there
    if threading.current_thread() is not threading.main_thread() or not getattr(leaving, "upop_leave", False):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, leaving)

