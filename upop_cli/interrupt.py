"""Ctrl-C outside a command body: one line and exit 130 (nothing has been written yet, so nothing is lost).

Kept free of imports beyond ``os`` and ``signal`` (both loaded with the interpreter): it is installed before
anything else is imported, so the window in which Python's own traceback could show is the interpreter's start.
"""

from __future__ import annotations

import os
import signal

EXIT_INTERRUPTED = 130
_said = False


def _leave(signum: int, frame: object) -> None:
    global _said
    if not _said:
        _said = True
        try:
            os.write(2, b"interrupted\n")
        except OSError:
            pass
    os._exit(EXIT_INTERRUPTED)


def quiet_interrupts() -> None:
    """From now on (outside ``armed``) Ctrl-C leaves at once with one line."""
    # An ignored SIGINT (``nohup``, a background job) stays ignored.
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _leave)
    except ValueError:  # not the main thread: signals are not this thread's to handle
        pass


def said() -> None:
    """The line was printed (by the command's own handler): a second Ctrl-C in the teardown stays silent."""
    global _said
    _said = True


class armed:
    """Inside a command body Ctrl-C is Python's ``KeyboardInterrupt``, so a run can save its state."""

    def __enter__(self) -> None:
        import threading

        self.active = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _leave
        if self.active:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, _leave)

