"""``upop compress --nproc N``: hand the same command to torchrun, which starts N workers.

upop does not coordinate processes itself: torch.distributed.run (torchrun) starts the workers,
runs the rendezvous across nodes and restarts the group after a failure (``--max-restarts``);
each worker is ``python -m upop_cli compress ...`` with the user's options, minus the launch ones.
"""

from __future__ import annotations

import logging
import os
import sys

from typing import Any

from upop.errors import ConfigError

def worker_args(command: str, options: dict[str, Any], switches: dict[str, bool]) -> list[str]:
    """The command again, for the workers: every option that was given (``None``: not given) and
    every switch that is on, each under its flag name (``batch_size`` → ``--batch-size``)."""
    args = [command]
    for name, value in options.items():
        if isinstance(value, bool):  # an on/off option: --name / --no-name
            args.append(("--" if value else "--no-") + name.replace("_", "-"))
        elif value is not None:
            args += ["--" + name.replace("_", "-"), str(value)]
    args += ["--" + name.replace("_", "-") for name, on in switches.items() if on]
    return args


def torchrun_args(nproc: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str, max_restarts: int,
                  worker: list[str]) -> list[str]:
    if nproc < 1 or nnodes < 1 or max_restarts < 0:
        raise ConfigError("--nproc and --nnodes must be at least 1, --max-restarts at least 0")
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    rdzv = (["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
            if rdzv_endpoint else ["--standalone"])
    return ["--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            *rdzv, "--module", "upop_cli", *worker]


def launch(args: list[str]) -> int:
    """Run torchrun in this process; the exit status of the first failed worker, or 0."""
    # torchrun's loggers take their level from LOGLEVEL when first imported; the workers say what matters.
    os.environ.setdefault("LOGLEVEL", "ERROR")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 (and warn); share the cores instead
        nproc = int(args[args.index("--nproc-per-node") + 1])
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        run(parse_args(args))
    except SignalException as exc:  # Ctrl-C or a kill reached the launcher; it stopped the workers
        print(f"interrupted (signal {int(exc.sigval)}); run the same command with --resume to continue from the "
              "last checkpoint", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        code = next((c for c in codes if c not in (0, None)), 1)
        if code < 0:  # killed by a signal: report it as the shell would
            print(f"error: a worker was killed by signal {-code}; rerun with --resume to continue from the last "
                  "checkpoint", file=sys.stderr)
            return 128 - code
        return int(code)
    return 0
