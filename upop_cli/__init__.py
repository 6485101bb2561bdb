"""The ``upop`` command line (Typer + rich). Commands are thin: they parse, call the library, print.

Ctrl-C before a command body runs (Python still importing torch, the arguments being parsed) has nothing
to save: in the ``upop`` process it prints one line and exits 130 from here on, never a traceback
(``upop_cli.errors.guarded`` turns it back into ``KeyboardInterrupt`` while a command body runs).
"""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0]) == "upop" or _sys.argv[:1] == ["-m"]:
    from .interrupt import quiet_interrupts

    quiet_interrupts()
