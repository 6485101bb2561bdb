"""Slim checkpoints: safetensors weights + a manifest that rebuilds the exact slim structure.

``from_pretrained`` cannot load a slimmed folder (size mismatch, or a silent re-init with
``ignore_mismatched_sizes``), so the manifest stores the base config and the kept units of
every module; loading builds the base structure, slims it, then loads the weights strictly.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from ._version import __version__
from .adapters import Adapter, get_adapter
from .errors import CheckpointError, UnsupportedModelError
from .slim import slim_model

FORMAT = "upop-slim"
FORMAT_VERSION = 1
MANIFEST = "upop_manifest.json"
WEIGHTS = "model.safetensors"


@dataclass
class Stage:
    """One slimming pass: the units kept in every module of the model as it was then."""

    granularity: str
    kept: dict[str, list[int]]
    units: dict[str, int]  # units each module had before the pass
    ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "ratio": self.ratio, "kept": self.kept, "units": self.units}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Stage":
        return cls(granularity=d["granularity"], kept={k: list(map(int, v)) for k, v in d["kept"].items()},
                   units={k: int(v) for k, v in d["units"].items()}, ratio=d.get("ratio"))


@dataclass
class SlimInfo:
    """What upop knows about a (possibly slimmed) model: enough to rebuild it."""

    family: str
    class_name: str
    base_config: dict[str, Any]
    stages: list[Stage] = field(default_factory=list)
    profile: str | None = None
    source: str | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_structure(info: SlimInfo) -> tuple[nn.Module, Adapter]:
    """The slim model's structure (weights arbitrary): the base model, slimmed by every stage."""
    adapter = get_adapter(info.base_config.get("model_type", ""))
    config = adapter.config_from_dict(info.base_config)
    model = adapter.build(info.class_name, config)
    for stage in info.stages:
        specs = adapter.modules(model)
        names = {s.name for s in specs}
        if names != set(stage.kept):
            missing = sorted(names - set(stage.kept))[:3]
            extra = sorted(set(stage.kept) - names)[:3]
            raise CheckpointError(
                f"manifest does not match the model's modules (missing: {missing}, unknown: {extra})"
            )
        for s in specs:
            if s.num_units(stage.granularity) != stage.units[s.name]:
                raise CheckpointError(f"manifest: module {s.name} has {s.num_units(stage.granularity)} units, "
                                      f"the manifest says {stage.units[s.name]}")
        slim_model(model, specs, stage.kept, stage.granularity, adapter)
    return model, adapter


def make_temp_dir(final: Path) -> Path:
    """A temporary sibling of ``final`` with the permissions a normal mkdir would give it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; renamed onto ``final`` (replacing it) only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final)
    try:
        yield tmp
        _commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit_dir(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_slim(
    model: nn.Module,
    out_dir: str | Path,
    info: SlimInfo,
    *,
    processor: Any | None = None,
    extra: dict[str, Any] | None = None,
    extra_writer: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a slim checkpoint folder atomically (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_dir(out_dir) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        adapter = get_adapter(model)
        modules = {}
        for s in adapter.modules(model):
            d: dict[str, Any] = {"kind": s.kind, "tower": s.tower, "role": s.role}
            if s.kind == "attn":
                d.update(num_heads=s.num_heads, head_dim=s.head_dim)  # type: ignore[union-attr]
            else:
                d.update(width=s.width)  # type: ignore[union-attr]
            modules[s.name] = d
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "upop_version": __version__,
            "family": info.family,
            "model_class": info.class_name,
            "base_config": info.base_config,
            "source": info.source,
            "profile": info.profile,
            "stages": [s.to_dict() for s in info.stages],
            "modules": modules,
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)},
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if extra_writer is not None:
            extra_writer(tmp)
    return out_dir


def is_slim_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a upop slim checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a upop slim manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{mpath} has no format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer upop (format {version}, this upop reads up to {FORMAT_VERSION}); "
            "upgrade upop"
        )
    for key in ("family", "model_class", "base_config", "stages", "weights"):
        if key not in manifest:
            raise CheckpointError(f"{mpath} is missing the key {key!r}")
    return manifest


def load_slim(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the slim model saved in ``path``; verify the weights' hash; load strictly."""
    path = Path(path)
    manifest = read_manifest(path)
    wfile = path / manifest["weights"].get("file", WEIGHTS)
    if not wfile.is_file():
        raise CheckpointError(f"{path}: weights file {wfile.name} is missing")
    digest = sha256_file(wfile)
    if digest != manifest["weights"].get("sha256"):
        raise CheckpointError(
            f"{wfile} does not match the manifest (sha256 differs): the file is truncated, corrupt or was replaced"
        )
    try:
        info = info_from_manifest(manifest)
        model, _adapter = build_structure(info)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: manifest cannot rebuild the model: {exc}") from None
    except UnsupportedModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        missing, unexpected = load_model(model, str(wfile), strict=True, device=device)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{wfile} does not fit the manifest's structure: {first}") from None
    model.to(device)
    model.eval()
    return model, manifest


def info_from_manifest(manifest: dict[str, Any]) -> SlimInfo:
    return SlimInfo(
        family=manifest["family"],
        class_name=manifest["model_class"],
        base_config=manifest["base_config"],
        stages=[Stage.from_dict(s) for s in manifest["stages"]],
        profile=manifest.get("profile"),
        source=manifest.get("source"),
    )
