"""What upop may replace or delete, one run per output, and file names from untrusted files.

upop replaces or deletes only folders it wrote itself, each recognised by the file it writes
into it: a slim checkpoint's manifest, an export's ``export.json`` (or TensorRT's
``engines.json``), a converted model's ``upop_convert.json``, a run state's ``.upop-run``.
Anything else -- a user's folder that happens to have the same name, the model or data a run reads --
is refused with one line, never cleared.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .errors import OutputError, OutputExistsError, UpopError

#: Written into ``<out>.partial/`` by every save of the run state; only a folder holding it is cleared.
STATE_MARKER = ".upop-run"
SLIM_MANIFEST = "upop_manifest.json"
EXPORT_MANIFEST = "export.json"
ENGINES_MANIFEST = "engines.json"
CONVERT_MARKER = "upop_convert.json"
#: What a run state folder may hold (a state written before the marker existed has only these).
STATE_FILES = frozenset({"state.pt", ".state.pt.tmp", STATE_MARKER})
MIN_FREE = 16 << 20


def _json_field(path: Path, key: str) -> object:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def owned_by_upop(folder: str | Path) -> bool:
    """Whether ``folder`` is one upop wrote (and so may replace): it holds one of upop's marker files."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if any((folder / name).is_file() for name in (SLIM_MANIFEST, CONVERT_MARKER, STATE_MARKER)):
        return True
    # export.json and engines.json are common names: only upop's own content counts.
    return (_json_field(folder / EXPORT_MANIFEST, "upop_version") is not None
            or _json_field(folder / ENGINES_MANIFEST, "format") == "tensorrt")


def is_run_state(folder: str | Path) -> bool:
    """Whether ``<out>.partial`` may be used and cleared as the run's state: upop's marker is in it,
    or it holds nothing but state files (a state written before the marker existed; empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    return STATE_MARKER in names or names <= STATE_FILES


def state_folder(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_state_folder(out: str | Path) -> Path:
    """``<out>.partial``, refused when a folder (or file) of that name is not upop's run state."""
    partial = state_folder(out)
    if (partial.exists() or partial.is_symlink()) and not is_run_state(partial):
        raise OutputError(f"{partial} exists and is not a upop run state (no {STATE_MARKER} in it); upop keeps the "
                          "run's state there: move that folder away or choose another --out")
    return partial


def _relation(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "contains"
    return None


def check_apart(out: str | Path, sources: Iterable[str | Path | None], inputs: Iterable[str | Path | None] = ()) -> None:
    """``out`` must be neither a source folder, nor inside one, nor a parent of one; and neither an
    input folder (the data) nor a parent of one (writing inside the data is harmless)."""
    target = Path(out).expanduser().resolve()
    for src, allowed in [*((s, None) for s in sources), *((i, "is inside") for i in inputs)]:
        if src is None or not Path(src).expanduser().exists():
            continue  # a hub id or alias: nothing on disk to protect
        rel = _relation(target, Path(src).expanduser().resolve())
        if rel is not None and rel != allowed:
            raise OutputError(f"--out {out} {rel} the source {src}; write the output to another folder")


def check_replace(out: str | Path, *, overwrite: bool, sources: Iterable[str | Path | None] = (),
                  inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse to write ``out`` when that would replace anything that is not upop's own output, or
    touch the ``sources`` (a model) or ``inputs`` (data) the run reads."""
    out = Path(out)
    check_apart(out, sources, inputs)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    foreign = any(out.iterdir()) and not owned_by_upop(out)
    if foreign:
        raise OutputExistsError(f"output folder {out} already exists and was not written by upop; upop replaces "
                                "only its own folders (even with --overwrite): choose another --out")
    if not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; pass --overwrite to replace it")


def member(folder: str | Path, name: object, what: str, error: type[UpopError]) -> Path:
    """``folder / name`` for a file name read from an untrusted file; refused when it leaves ``folder``."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise error(f"{folder}: {what} {name!r} is not a file name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or rel.parts in ((), (".",)):
        raise error(f"{folder}: {what} {name!r} leaves its folder")
    return Path(folder) / rel


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def weights_bytes(source: str | Path | None) -> int:
    """Bytes of the weight files directly in a local model folder (0 for a hub id)."""
    if source is None or not Path(source).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(source).iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def check_room(out: str | Path, need: int) -> None:
    """Before an hour of search: ``out``'s parent can be written and has about ``need`` bytes free."""
    parent = _existing_ancestor(Path(out).parent)
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: {parent} is not writable")
    need = max(need, MIN_FREE)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OutputError(f"{parent} has {free / 2**20:.0f} MiB free; this run needs about {need / 2**20:.0f} MiB "
                          "(its state and the slim checkpoint): free some space or choose another --out")


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lock")


class OutputLock:
    """An exclusive lock on one output: ``<out>.lock`` beside ``<out>`` and ``<out>.partial``, holding the pid.

    ``flock`` locks die with their process, so the lock of a killed run is stale by itself: the next
    run takes the leftover file over."""

    def __init__(self, out: str | Path):
        self.out, self.path, self.fd = Path(out), lock_path(out), None

    def acquire(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                self.fd = self._try_once()
        except OSError as exc:
            raise OutputError(f"cannot write {self.out}: {exc.strerror or exc}") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def _try_once(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise OutputError(f"another upop run{f' (pid {pid})' if pid else ''} is writing {self.out}; "
                              "wait for it to end or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: take the new one
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def never_prompt_for_remote_code() -> None:
    """Defence in depth for the CLI: every ``from_pretrained`` in upop passes ``trust_remote_code=False``;
    should one ever miss it, transformers would ask on stdin (``yes y | upop ...`` would answer). With
    its timeout at 0 it raises instead of asking."""
    from transformers import dynamic_module_utils

    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0
