"""Where the CLI writes: one console factory, so every command prints the same way on a terminal and in a log.

Off a terminal rich prints plain text (no colour codes, no live redraws); the width is then 120 columns
(or ``COLUMNS``) instead of 80, so a summary table stays one row per line in a log file. Messages go
through ``Console.print``: ``Console.log`` would add the source file and line of the call on the right.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

PLAIN_WIDTH = 120


def console(stderr: bool = False, quiet: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else PLAIN_WIDTH
    return Console(stderr=stderr, quiet=quiet, width=width, log_path=False)


def print_json(data: Any) -> None:
    """The machine-readable result, alone on stdout (plain ``print``: no rich markup or wrapping)."""
    print(json.dumps(data, indent=2, default=str))
