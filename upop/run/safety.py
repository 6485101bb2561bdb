"""What upop may replace or delete, one run per output, and file names from untrusted files.

Ownership is by content, not by folder name: every folder upop writes gets ``.upop-owned.json`` (its kind
and the files upop put in it), and upop replaces a folder only when it is of the same kind and holds
nothing else -- a file a user added to an output keeps the whole folder from being replaced. Folders
written before that record existed are recognised by their marker file (a slim checkpoint's manifest, an
export's ``export.json`` or ``engines.json``, a converted model's ``upop_convert.json``) and by the names
upop writes there. A symbolic link given as an output is never replaced. Files (``profile --json FILE``, a
calibrated profile, ``latest.json``) are replaced only when their content is upop's own of the same kind.
Anything else -- a user's folder or file that happens to have the same name, the model, teacher, data or
cache a run reads -- is refused with one line, never cleared.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..errors import OutputError, OutputExistsError, UpopError

#: Written into ``<out>.partial/`` by every save of the run state; only a folder holding it is cleared.
STATE_MARKER = ".upop-run"
SLIM_MANIFEST = "upop_manifest.json"
EXPORT_MANIFEST = "export.json"
ENGINES_MANIFEST = "engines.json"
CONVERT_MARKER = "upop_convert.json"
DEMO_MARKER = "upop_demo.json"
#: What a run state folder may hold (a state written before the marker existed has only these).
STATE_FILES = frozenset({"state.pt", ".state.pt.tmp", STATE_MARKER})
MIN_FREE = 16 << 20


#: In every folder upop writes: the output's kind and every file upop put in it (what it may replace).
OWNED_RECORD = ".upop-owned.json"
#: What the kinds are called in messages.
KIND_NAMES = {"slim": "slim checkpoint", "export": "export", "convert": "converted model", "state": "run state",
              "shapes": "shapes data set", "demo": "demo model", "folder": "output folder",
              "profile": "hardware profile", "profile-json": "profile result", "latest": "record of the last compress"}
#: Names upop writes into its folders: how a folder written before ``OWNED_RECORD`` existed is read.
LEGACY_NAMES = ("upop_manifest.json", "model.safetensors", "report.json", "report.md", "compression.png",
                "upop_config.json", "config.json", "generation_config.json", "tokenizer*", "vocab.txt", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                "processor_config.json", "export.json", "engines.json", "*.onnx", "*.onnx.data", "*.engine",
                "upop_convert.json", DEMO_MARKER, STATE_MARKER, "state.pt", ".state.pt.tmp", OWNED_RECORD)
MAX_JSON_DEPTH = 64
MAX_LISTED = 4


# -- JSON from files upop did not necessarily write ---------------------------------------------------

def _too_deep(data: object, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if items is None:
            continue
        if depth > limit:
            return True
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return False


def check_depth(data: object, where: object, error: type[UpopError]) -> object:
    if _too_deep(data, MAX_JSON_DEPTH):
        raise error(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep: not a file upop reads")
    return data


def load_json(text: str | bytes, where: object, error: type[UpopError]) -> object:
    """``json.loads`` of an untrusted text: nesting past ``MAX_JSON_DEPTH`` levels (or past Python's own
    recursion limit, where the parser itself gives up) and invalid JSON are one line naming ``where``."""
    deep = error(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep: not a file upop reads")
    try:
        data = json.loads(text)
    except RecursionError:
        raise deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or ["invalid"])[0]
        raise error(f"{where} is not valid JSON: {first[:200]}") from None
    return check_depth(data, where, error)


def read_json(path: str | Path, error: type[UpopError]) -> object:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    return load_json(raw, path, error)


def _json_field(path: Path, key: str) -> object:
    try:
        data = load_json(path.read_bytes(), path, UpopError)
    except (OSError, UpopError):
        return None
    return data.get(key) if isinstance(data, dict) else None


# -- saying something once ------------------------------------------------------------------------------

_SAID: set[str] = set()


def say_once(message: str) -> None:
    """A note the user should read once per run (an option capped or unused), on stderr, by rank 0 only."""
    if message in _SAID or os.environ.get("RANK", "0") != "0":
        return
    _SAID.add(message)
    print(f"note: {message}", file=sys.stderr, flush=True)


def forget_notes() -> None:
    """A new command in this process says its notes again."""
    _SAID.clear()


# -- what upop owns -----------------------------------------------------------------------------------

def _record(folder: Path) -> dict | None:
    try:
        data = load_json((folder / OWNED_RECORD).read_bytes(), OWNED_RECORD, UpopError)
    except (OSError, UpopError):
        return None
    if isinstance(data, dict) and isinstance(data.get("kind"), str) and isinstance(data.get("files"), list) \
            and all(isinstance(f, str) for f in data["files"]):
        return data
    return None


def marker_kind(folder: str | Path) -> str | None:
    """The kind of upop output ``folder`` is (``slim``, ``export``, ...), or None when it is not upop's."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    record = _record(folder) if (folder / OWNED_RECORD).is_file() else None
    if record is not None:
        return str(record["kind"])
    for name, kind in ((SLIM_MANIFEST, "slim"), (CONVERT_MARKER, "convert"), (STATE_MARKER, "state"),
                       (DEMO_MARKER, "demo")):
        if (folder / name).is_file():
            return kind
    # export.json is a common name: only upop's own content counts. A runtime's folder built on the ONNX graphs
    # (TensorRT's engines, OpenVINO's IR) holds upop's ONNX export in onnx/: that marks it, whatever the runtime.
    if _json_field(folder / EXPORT_MANIFEST, "upop_version") is not None \
            or _json_field(folder / "onnx" / EXPORT_MANIFEST, "upop_version") is not None:
        return "export"
    return None


def owned_by_upop(folder: str | Path) -> bool:
    """Whether ``folder`` is an output upop wrote (its record, or the marker file of an older upop)."""
    return marker_kind(folder) is not None


def _entries(folder: Path) -> Iterator[str]:
    """Every file, link and empty folder under ``folder`` (links are not followed), as relative paths."""
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        dirs[:] = [d for d in dirs if d not in links]
        if not dirs and not files and not links and root != str(folder):
            yield rel.as_posix() + "/"
        for name in (*files, *links):
            yield (rel / name).as_posix()


def foreign_entries(folder: str | Path) -> list[str]:
    """What is in upop's output ``folder`` that upop did not write there."""
    folder = Path(folder)
    record = _record(folder) if (folder / OWNED_RECORD).is_file() else None
    if record is not None:
        listed = {*record["files"], OWNED_RECORD}
        return sorted(e for e in _entries(folder) if e not in listed)
    return sorted(e for e in _entries(folder)
                  if not any(fnmatch.fnmatchcase(PurePosixPath(e).name, p) for p in LEGACY_NAMES))


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _check_ours(out: Path, kind: str | None) -> None:
    have = marker_kind(out)
    if have is None:
        raise OutputExistsError(f"output folder {out} already exists and was not written by upop; upop replaces "
                                "only its own folders (even with --overwrite): choose another --out")
    if kind is not None and have != kind:
        raise OutputExistsError(f"{out} is a upop {KIND_NAMES.get(have, have)} and this command writes a "
                                f"{KIND_NAMES.get(kind, kind)}: one kind of output never replaces another (even with "
                                "--overwrite); choose another --out")
    foreign = foreign_entries(out)
    if foreign:
        raise OutputExistsError(f"{out} holds {_listed(foreign)}, which upop did not write; upop replaces only what "
                                "it wrote (even with --overwrite): move that away or choose another --out")


def cache_root() -> Path:
    """upop's cache (the demo data): ``UPOP_CACHE``, else ``~/.cache/upop``."""
    return Path(os.environ.get("UPOP_CACHE") or Path.home() / ".cache" / "upop")


def _refuse_link(out: Path) -> None:
    if out.is_symlink():
        raise OutputExistsError(f"{out} is a symbolic link; upop never replaces a link (even with --overwrite): "
                                "give the path it points to, or another --out")


def is_run_state(folder: str | Path) -> bool:
    """Whether ``<out>.partial`` may be used and cleared as the run's state: upop's marker is in it,
    or it holds nothing but state files (a state written before the marker existed; empty)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    return STATE_MARKER in names or names <= STATE_FILES


def state_folder(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_state_folder(out: str | Path) -> Path:
    """``<out>.partial``, refused when a folder (or file) of that name is not upop's run state."""
    partial = state_folder(out)
    if (partial.exists() or partial.is_symlink()) and (partial.is_symlink() or not is_run_state(partial)):
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
    """``out`` must be neither a source folder (the model, the teacher, upop's cache), nor inside one, nor a
    parent of one; and neither an input folder (the data) nor a parent of one (writing inside the data is harmless)."""
    target = Path(out).expanduser().absolute()
    target = target.parent.resolve() / target.name  # the link itself, not what it points to
    for src, allowed in [*((s, None) for s in sources), *((i, "is inside") for i in inputs)]:
        if src is None or not Path(src).expanduser().exists():
            continue  # a hub id or alias: nothing on disk to protect
        rel = _relation(target, Path(src).expanduser().resolve())
        if rel is None and target.exists():
            rel = _relation(target.resolve(), Path(src).expanduser().resolve())
        if rel is not None and rel != allowed:
            raise OutputError(f"--out {out} {rel} the source {src}; write the output to another folder")


def check_replace(out: str | Path, *, overwrite: bool, sources: Iterable[str | Path | None] = (),
                  inputs: Iterable[str | Path | None] = (), kind: str | None = None, in_cache: bool = False) -> None:
    """The rule of every folder output, before any work: refuse to write ``out`` when that would replace
    a link, anything that is not upop's own output of this ``kind`` or anything upop did not write in it,
    or touch the ``sources`` (model, teacher, cache) or ``inputs`` (data) the run reads. ``in_cache``: upop's
    own write into its cache."""
    out = Path(out)
    check_apart(out, [*sources, *([] if in_cache else [cache_root()])], inputs)
    _refuse_link(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    if any(out.iterdir()):
        _check_ours(out, kind)
    if not overwrite:
        raise OutputExistsError(f"output folder {out} already exists; pass --overwrite to replace it")


def check_file(path: str | Path, *, kind: str, overwrite: bool, recognise: Callable[[Path], bool],
               sources: Iterable[str | Path | None] = ()) -> None:
    """The rule of every file output: a link, a folder or a file whose content is not upop's ``kind`` is
    never replaced; upop's own file only with ``overwrite``."""
    path = Path(path)
    check_apart(path, [*sources, cache_root()])
    _refuse_link(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; a {KIND_NAMES.get(kind, kind)} is a file: give a file name")
    if not path.exists():
        return
    if not recognise(path):
        raise OutputExistsError(f"{path} exists and is not a {KIND_NAMES.get(kind, kind)} written by upop; upop "
                                "never replaces a file it did not write (even with --overwrite): choose another name")
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")


# -- writing: atomically, with the user's umask ---------------------------------------------------------

def current_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and back at once)
    os.umask(mask)
    return mask


def _as_open_would(tmp: Path) -> None:
    """Temporary files and folders are private (0600/0700); what is published gets the modes a plain
    ``open()``/``mkdir`` would give it, so a teammate can read a model on a shared cluster."""
    mask = current_umask()
    os.chmod(tmp, 0o777 & ~mask)
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask, follow_symlinks=False)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), 0o666 & ~mask)


def write_file(path: str | Path, data: str | bytes, *, kind: str, overwrite: bool,
               recognise: Callable[[Path], bool], sources: Iterable[str | Path | None] = (),
               verify: Callable[[Path], object] | None = None) -> Path:
    """The one way upop writes a file output: ``check_file``'s rule, then a temporary sibling renamed
    into place (``verify`` reads it back first), with the user's umask."""
    path = Path(path)
    check_file(path, kind=kind, overwrite=overwrite, recognise=recognise, sources=sources)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.chmod(name, 0o666 & ~current_umask())
            if verify is not None:
                verify(Path(name))
            _refuse_link(path)  # again: nothing may have put a link there meanwhile
            os.replace(name, path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc.strerror or exc}") from None
    return path


def make_temp_dir(final: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _mark(tmp: Path, kind: str) -> None:
    files = sorted(e for e in _entries(tmp) if not e.endswith("/"))
    (tmp / OWNED_RECORD).write_text(json.dumps({"kind": kind, "files": files, "written_by": "upop"}, indent=1))


def _commit_dir(tmp: Path, final: Path, kind: str | None) -> None:
    kind = kind or marker_kind(tmp) or "folder"
    _mark(tmp, kind)
    _as_open_would(tmp)
    _refuse_link(final)  # checked before the work, and again now: the user may have changed it meanwhile
    old = None
    if final.exists():
        if not final.is_dir():
            raise OutputExistsError(f"{final} exists and is not a folder; choose another --out")
        if any(final.iterdir()):
            _check_ours(final, kind)
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "x")
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:  # the earlier output goes back where it was
            os.replace(old / "x", final)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def output_dir(final: str | Path, kind: str | None = None) -> Iterator[Path]:
    """The one way upop writes a folder output: a temporary sibling to fill, published onto ``final`` only
    on success (with its ``OWNED_RECORD`` and the user's umask), never over a link, a folder of another
    kind or anything upop did not write. The caller checks ``check_replace`` (and ``--overwrite``) first."""
    final = Path(final)
    _refuse_link(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final)
    try:
        yield tmp
        _commit_dir(tmp, final, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


LOCK_MARK = "upop output lock"


def _lock_pid(content: bytes) -> str | None:
    """The pid in a lock file's content when the content is upop's own, else None."""
    lines = content.decode(errors="replace").splitlines()
    if len(lines) == 2 and lines[0] == LOCK_MARK and lines[1].startswith("pid ") and lines[1][4:].isdigit():
        return lines[1][4:]
    return None


class OutputLock:
    """An exclusive lock on one output: ``<out>.lock`` beside ``<out>`` and ``<out>.partial``.

    The file is created exclusively and never through a link (``O_CREAT|O_EXCL|O_NOFOLLOW``) and holds
    upop's mark and the pid; a ``<out>.lock`` without that mark is the user's and is refused, never
    written or removed. ``flock`` locks die with their process, so the lock of a killed run is stale by
    itself: the next run takes the leftover file over. Released, the file is removed only if it is still
    the one this run holds."""

    def __init__(self, out: str | Path):
        self.out, self.path, self.fd = Path(out), lock_path(out), None
        self.mine = f"{LOCK_MARK}\npid {os.getpid()}\n".encode()

    def acquire(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(50):
                self.fd = self._try_once(attempt)
                if self.fd is not None:
                    return self
                time.sleep(0.02)
        except OSError as exc:
            raise OutputError(f"cannot write {self.out}: {exc.strerror or exc}") from None
        raise self._foreign()

    def _foreign(self) -> OutputError:
        return OutputError(f"{self.path} exists and is not a upop lock; upop locks {self.out} with a file of that "
                           "name: move it away or choose another --out")

    def _busy(self, fd: int) -> OutputError:
        pid = _lock_pid(os.pread(fd, 256, 0))
        return OutputError(f"another upop run{f' (pid {pid})' if pid else ''} is writing {self.out}; "
                           "wait for it to end or choose another --out")

    def _try_once(self, attempt: int) -> int | None:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            try:
                fd, created = os.open(self.path, flags), False
            except FileNotFoundError:
                return None  # released meanwhile: create it
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link: never followed
                    raise self._foreign() from None
                raise
        try:
            return self._lock(fd, created, attempt)
        except BaseException:
            os.close(fd)
            raise

    def _lock(self, fd: int, created: bool, attempt: int) -> int | None:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise self._foreign()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(fd) from None
        if not created:
            content = os.pread(fd, 256, 0)
            if content == b"" and attempt < 49:  # its creator may not have written its mark yet
                os.close(fd)
                return None
            if _lock_pid(content) is None:
                raise self._foreign()
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: take the new one
                os.close(fd)
                return None
            os.ftruncate(fd, 0)  # a killed run's lock: ours now
        os.pwrite(fd, self.mine, 0)
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path, follow_symlinks=False)) \
                    and os.pread(self.fd, 256, 0) == self.mine:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- model configs and pickles from files upop did not write ---------------------------------------------

#: Integer sizes of a model config, checked before anything is built from them.
CONFIG_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings", "projection_dim")
MAX_CONFIG_INT = 1 << 20


def _subconfigs(cfg: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    yield prefix, cfg
    for key, value in cfg.items():
        if key.endswith("_config") and isinstance(value, dict):
            yield from _subconfigs(value, f"{prefix}{key}.")


def check_config_dict(cfg: object, where: object, error: type[UpopError], stored: int | None = None) -> None:
    """A model config read from a user's file, before any model is built from it: the sizes are integers
    in range, it asks for no custom code, and it describes about as many parameters as the weights hold
    (a layer count of 100,000 is one line at once, not minutes of building)."""
    if not isinstance(cfg, dict):
        raise error(f"{where}: the model config must be an object")
    if "auto_map" in cfg:
        raise error(f"{where} asks for custom code (auto_map); upop never runs code from a model folder: use a "
                    "folder of a supported architecture")
    estimate, sizes = 0, []
    for prefix, sub in _subconfigs(cfg):
        for key in CONFIG_INTS:
            value = sub.get(key)
            if key in sub and value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                                         and 0 < value <= MAX_CONFIG_INT):
                raise error(f"{where}: {prefix}{key} must be an integer in 1..{MAX_CONFIG_INT}, got {value!r}")
        width, layers = sub.get("hidden_size"), sub.get("num_hidden_layers")
        if width and layers:
            estimate += layers * (4 * width * width + 2 * width * (sub.get("intermediate_size") or 4 * width))
            sizes.append(f"{prefix}num_hidden_layers {layers}")
    if stored is not None and estimate > 4 * stored + (1 << 20):
        raise error(f"{where} describes about {estimate:,} parameters ({', '.join(sizes)}), the weights hold "
                    f"{stored:,} values: the config does not belong to these weights")


def load_tensors(path: str | Path, error: type[UpopError], what: str) -> object:
    """``torch.load`` of a user's file with ``weights_only=True`` (no code runs); torch's warnings about the
    file are folded into the one line of a file that cannot be read that way."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise error(f"{path} is not {what}: it holds pickled objects beyond tensors, which upop never loads "
                    "(only tensors are read, weights_only=True)") from None
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch raise many kinds; all mean "unreadable"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise error(f"{path} is not {what}: {first}") from None


def never_prompt_for_remote_code() -> None:
    """Defence in depth for the CLI: every ``from_pretrained`` in upop passes ``trust_remote_code=False``;
    should one ever miss it, transformers would ask on stdin (``yes y | upop ...`` would answer). With
    its timeout at 0 it raises instead of asking."""
    from transformers import dynamic_module_utils

    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0
