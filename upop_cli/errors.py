"""The one place where exceptions become what the user reads.

Known errors (``UpopError``) print one line on stderr and exit 2; Ctrl-C exits 130.
``UPOP_DEBUG=1`` re-raises so the full traceback shows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import typer

from upop.errors import UpopError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C with something to say (where the resumable state went)."""


def debug() -> bool:
    return os.environ.get("UPOP_DEBUG", "") not in ("", "0", "false", "no")


def guarded(fn: Callable[[], Any], arm: bool = True) -> Any:
    """Run a command body; known errors become one line and an exit code. ``arm``: Ctrl-C raises
    ``KeyboardInterrupt`` inside it (a run saves its state); elsewhere it leaves at once (``upop_cli.interrupt``)."""
    from upop.run.safety import forget_notes

    from .interrupt import armed, said

    forget_notes()
    try:
        with armed() if arm else contextlib.nullcontext():
            return fn()
    except UpopError as exc:
        if debug():
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except (KeyboardInterrupt, Interrupted) as exc:
        if debug():
            raise
        said()
        typer.echo(str(exc) if isinstance(exc, Interrupted) else "interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def run_guarded(fn: Callable[[], Any]) -> int:
    """Process entry point: the exit status of ``fn`` (a Typer app or a command body)."""
    try:
        guarded(fn, arm=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
