"""The state of an unfinished compress run, for ``--resume``: a typed record and the folder that holds it.

The folder (``<out>.partial/`` from the CLI) is upop's own: it carries a marker file, and upop
clears only a folder that has it. The state is one torch file of plain tensors and Python values,
written to a temporary name and renamed (a kill -9 mid-write leaves the previous state intact) and
read back with ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, OutputError
# STATE_MARKER: the marker that makes a state folder upop's own (only such a folder is cleared)
from .safety import STATE_MARKER, is_run_state, load_tensors

STATE_VERSION = 1
__all__ = ["STATE_MARKER", "Baseline", "RunState", "StateStore"]
PHASES = ("search", "retrain", "done")


@dataclass
class Baseline:
    """The unpruned model's metrics, measured once before the search."""

    test: dict[str, float] | None = None  # the report's test metrics
    val: float | None = None  # the model-selection metric
    latency: dict[str, Any] | None = None  # measured: {runtime: {batch: {p50_ms, p90_ms, runs}}}


@dataclass
class RunState:
    """Where a run stopped. ``phase``: ``search`` (``search`` holds the loop state), ``retrain`` (the search is
    done: ``search_result`` and the slim weights, ``retrain`` the loop state once it began), or ``done`` (the
    run finished but its output was not written: ``final_model`` and ``report``)."""

    phase: str
    baseline: Baseline
    search: dict[str, Any] | None = None
    search_result: dict[str, Any] | None = None
    slim_model: dict[str, torch.Tensor] | None = None
    retrain: dict[str, Any] | None = None
    final_model: dict[str, torch.Tensor] | None = None
    report: dict[str, Any] | None = None
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["baseline"] = dataclasses.asdict(self.baseline)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "RunState":
        """Checks the shape of an untrusted state before anything uses it."""
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{where} is not a usable run state ({why}); delete it to start over")

        if not isinstance(data, dict):
            raise bad("not a mapping")
        if "version" not in data:
            raise bad("a state from an earlier upop version, which this one cannot resume")
        if not isinstance(data.get("version"), int) or data["version"] > STATE_VERSION:
            raise bad(f"state version {data.get('version')!r}, this upop reads up to {STATE_VERSION}")
        if data.get("phase") not in PHASES:
            raise bad(f"unknown phase {data.get('phase')!r}")
        base = data.get("baseline")
        if not isinstance(base, dict) or not {"test", "val"} <= set(base) <= {"test", "val", "latency"}:
            raise bad("no baseline metrics")
        needed = {"search": ("search",), "retrain": ("search_result", "slim_model|retrain"),
                  "done": ("search_result", "final_model", "report")}[data["phase"]]
        for keys in needed:
            if not any(isinstance(data.get(k), dict) for k in keys.split("|")):
                raise bad(f"no {keys.replace('|', ' or ')}")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields and k != "baseline"}, baseline=Baseline(**base))

    def step(self) -> int:
        inner = self.search if self.phase == "search" else self.retrain if self.phase == "retrain" else None
        return int(inner["step"]) if inner else 0


class StateStore:
    """The state folder of one run: saves, loads (checking it is this run's) and clears it."""

    def __init__(self, folder: str | Path, config: dict[str, Any], run: dict[str, Any] | None = None):
        self.folder, self.config, self.run = Path(folder), config, run or {}
        self.path = self.folder / "state.pt"

    def owned(self) -> bool:
        return (self.folder / STATE_MARKER).is_file()

    def check_owned(self) -> None:
        """A folder of that name that upop did not write is the user's: never used, never cleared (the same
        rule as the CLI's check before a run, ``upop.run.safety.is_run_state``)."""
        if self.folder.exists() and not is_run_state(self.folder):
            raise CheckpointError(f"{self.folder} exists and is not a upop run state; move it away or choose "
                                  "another output (upop never writes into or deletes a folder it did not create)")

    def save(self, state: RunState) -> None:
        self.check_owned()
        if not self.owned():
            created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            # Whether upop made the folder: an empty one the user made is emptied of upop's files, not removed.
            (self.folder / STATE_MARKER).write_text(f"upop run state; created by upop: {'yes' if created else 'no'}\n")
        tmp = self.path.with_name(".state.pt.tmp")
        try:
            torch.save({"config": self.config, "run": self.run, **state.to_dict()}, tmp)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its stream writer
            tmp.unlink(missing_ok=True)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise OutputError(f"could not write the run's state to {self.path}: {first}") from None

    def load(self) -> RunState | None:
        if not self.path.is_file():
            return None
        self.check_owned()
        raw = load_tensors(self.path, CheckpointError, "a run state upop can read")  # damage of any kind: one line
        state = RunState.from_dict(raw, str(self.path))  # its shape (and version) first: untrusted until checked
        if raw.get("config") != self.config:
            raise ConfigError(f"the interrupted run in {self.folder} used other settings; "
                              "resume with the same options, or delete that folder")
        self._check_same_run(raw.get("run") or {})
        return state

    def _check_same_run(self, was: dict[str, Any]) -> None:
        for key, what in (("world_size", "processes"), ("per_rank_batch", "as batch size per process")):
            if key in was and key in self.run and was[key] != self.run[key]:
                raise ConfigError(f"the interrupted run in {self.folder} ran with {was[key]} {what}, this one with "
                                  f"{self.run[key]}; resume with the same --nproc and --batch-size")
        opts = "task_options"
        if opts in was and opts in self.run and was[opts] != self.run[opts]:
            raise ConfigError(f"the interrupted run in {self.folder} trained with {_options(was[opts])}, this one with "
                              f"{_options(self.run[opts])}; resume with the same options (--augment, --momentum, "
                              "--k-test), or delete that folder")
        if "ratio" in was and "ratio" in self.run and abs(was["ratio"] - self.run["ratio"]) > 1e-12:
            raise ConfigError(f"the interrupted run in {self.folder} searched for ratio {was['ratio']:.4f}, this one "
                              f"would use {self.run['ratio']:.4f} (the hardware profile changed?); resume with the "
                              "profile it ran with, or delete that folder")

    def clear(self) -> None:
        """Removes upop's files from the folder, and the folder itself if upop created it and nothing else is in it."""
        if not self.owned():
            return
        created = (self.folder / STATE_MARKER).read_text().strip().endswith("yes")
        for name in ("state.pt", ".state.pt.tmp", STATE_MARKER):
            (self.folder / name).unlink(missing_ok=True)
        if created and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _options(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "the task's defaults"
