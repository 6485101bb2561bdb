"""The one place where exceptions become what the user reads.

Known errors (``UpopError``) print one line on stderr and exit 2; Ctrl-C exits 130.
``UPOP_DEBUG=1`` re-raises so the full traceback shows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from upop.errors import UpopError


def debug() -> bool:
    return os.environ.get("UPOP_DEBUG", "") not in ("", "0", "false", "no")


def run_guarded(fn: Callable[[], Any]) -> int:
    try:
        fn()
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except UpopError as exc:
        if debug():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug():
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return 0
