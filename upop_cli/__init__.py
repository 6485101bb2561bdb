"""The ``upop`` command line (Typer + rich). Commands are thin: they parse, call the library, print.

Ctrl-C before a command body runs (Python still importing torch, the arguments being parsed) has nothing
to save: in the ``upop`` process it prints one line and exits 130 from here on, never a traceback
(``upop_cli.errors.guarded`` turns it back into ``KeyboardInterrupt`` while a command body runs).
"""

import os as _os
import sys as _sys

import signal as _signal


def _leave(signum, frame):  # the first thing installed: no import may stand before it
    from .interrupt import leave

    leave(signum, frame)


_leave.upop_leave = True  # type: ignore[attr-defined]

if (_os.path.basename(_sys.argv[0]) == "upop" or _sys.argv[:1] == ["-m"]) \
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # an ignored SIGINT stays ignored
    _signal.signal(_signal.SIGINT, _leave)
