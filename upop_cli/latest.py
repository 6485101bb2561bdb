"""The last compress output: ``upop export`` and ``upop profile`` with no path take it.

``upop compress`` writes ``latest.json`` (``{"path", "model", "written"}``) in its output root (the
output folder's parent when that is a ``upop-out`` folder, the default) once the output folder is complete,
atomically: a reader sees the old record or the new one, never half of one.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from upop.errors import ConfigError

DEFAULT_ROOT = Path("upop-out")
RECORD = "latest.json"


def write_latest(out: Path, model: str) -> Path | None:
    """Record ``out`` as the last compress output of its output root; returns the record's path.

    Only an output root named like upop's own (``upop-out``) gets a record: ``--out`` elsewhere is a folder of
    the user's, where upop adds nothing (and the record is only ever read from ``./upop-out``); nor is a
    ``latest.json`` there replaced unless it is a record upop wrote."""
    from upop.run.safety import write_file

    out = Path(out).resolve()
    record = out.parent / RECORD
    if out.parent.name != DEFAULT_ROOT.name or record.is_symlink() or (record.exists() and not _is_record(record)):
        return None
    data = {"path": str(out), "model": model, "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return write_file(record, json.dumps(data, indent=2) + "\n", kind="latest", overwrite=True, recognise=_is_record)


def _is_record(path: Path) -> bool:
    from upop.errors import UpopError
    from upop.run.safety import read_json

    try:
        data = read_json(path, UpopError)
    except UpopError:
        return False
    return isinstance(data, dict) and {"path", "model", "written"} <= set(data)


def read_latest(command: str, root: Path = DEFAULT_ROOT) -> Path:
    """The folder of the last ``upop compress`` under ``root``, or one line saying what to pass."""
    record = root / RECORD
    hint = f"pass a slim checkpoint folder (upop {command} upop-out/<model>-p<ratio>)"
    if not record.is_file():
        raise ConfigError(f"no path given and no earlier `upop compress` output in {root}/: {hint}, "
                          "or run upop compress first")
    from upop.run.safety import read_json

    try:
        path = Path(read_json(record, ConfigError)["path"])  # type: ignore[index]
    except (KeyError, TypeError):
        raise ConfigError(f"{record} is not a record written by upop compress: {hint}") from None
    if not path.is_dir():
        raise ConfigError(f"the last compress output {path} (from {record}) no longer exists: {hint}")
    return path


def source_or_latest(given: str | None, command: str) -> str:
    """``given``, or the last compress output, said on stderr (stdout stays clean for --json)."""
    if given:
        return given
    path = read_latest(command)
    try:  # upop-out/demo-blip-p0.5 rather than the absolute path, when it lies under the current folder
        path = path.relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    print(f"using the last compress output: {path}", file=sys.stderr)
    return str(path)
