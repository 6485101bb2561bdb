"""Slim checkpoints: safetensors weights + a manifest that rebuilds the exact slim structure.

``from_pretrained`` cannot load a slimmed folder (size mismatch, or a silent re-init with
``ignore_mismatched_sizes``), so the manifest stores the base config and the kept units of
every module; loading builds the base structure, slims it, then loads the weights strictly.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .._version import __version__
from ..adapters import Adapter, get_adapter
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from .safety import SLIM_MANIFEST, check_config_dict, check_replace, load_json, member, output_dir
from ..pruning.slim import slim_model

FORMAT = "upop-slim"
FORMAT_VERSION = 1
MANIFEST = SLIM_MANIFEST
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
    scoring: dict[str, Any] = field(default_factory=dict)  # the task options the run was scored with (k_test, ...)


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


#: A temporary sibling folder to fill, published onto the final path only on success (``upop.run.safety``).
atomic_dir = output_dir


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
    check_replace(out_dir, overwrite=overwrite, kind="slim")  # only a slim checkpoint upop wrote is ever replaced
    with atomic_dir(out_dir, kind="slim") as tmp:
        save_model(model, str(tmp / WEIGHTS))
        if processor is not None:
            processor.save_pretrained(str(tmp))
        adapter = get_adapter(model)
        modules = {s.name: s.manifest_row() for s in adapter.modules(model)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "upop_version": __version__,
            "family": info.family,
            "model_class": info.class_name,
            "base_config": info.base_config,
            "source": info.source,
            "profile": info.profile,
            "scoring": info.scoring,
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
    manifest = load_json(mpath.read_bytes(), mpath, CheckpointError)
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
    check_manifest(manifest, mpath)
    return manifest


def _require(ok: bool, where: Path, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{where}: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_manifest(manifest: dict[str, Any], mpath: Path) -> None:
    """The type of every field loading reads: a hand-edited or hostile manifest is one line, not a traceback."""
    for key in ("family", "model_class"):
        _require(isinstance(manifest[key], str), mpath, f"{key} must be a string")
    for key in ("profile", "source"):
        _require(manifest.get(key) is None or isinstance(manifest[key], str), mpath, f"{key} must be a string")
    _require(isinstance(manifest["base_config"], dict), mpath, "base_config must be an object")
    weights = manifest["weights"]
    _require(isinstance(weights, dict) and isinstance(weights.get("sha256"), str), mpath,
             "weights must be an object with a sha256 string")
    member(mpath.parent, weights.get("file", WEIGHTS), "weights file", CheckpointError)
    _require(isinstance(manifest["stages"], list), mpath, "stages must be a list")
    _check_scoring(manifest.get("scoring", {}), mpath)
    for i, stage in enumerate(manifest["stages"]):
        _check_stage(stage, mpath, i)


def _check_scoring(values: Any, mpath: Path) -> None:
    from ..tasks import check_scoring

    try:
        check_scoring(values)
    except ConfigError as exc:
        raise CheckpointError(f"{mpath}: {exc}") from None


def _check_stage(stage: Any, mpath: Path, i: int) -> None:
    where = f"stage {i}"
    _require(isinstance(stage, dict), mpath, f"{where} must be an object")
    _require(stage.get("granularity") in ("dim", "head"), mpath, f"{where}: granularity must be dim or head")
    ratio = stage.get("ratio")
    _require(ratio is None or (isinstance(ratio, (int, float)) and not isinstance(ratio, bool)), mpath,
             f"{where}: ratio must be a number")
    kept, units = stage.get("kept"), stage.get("units")
    _require(isinstance(kept, dict) and isinstance(units, dict) and set(kept) == set(units), mpath,
             f"{where}: kept and units must be objects naming the same modules")
    for name, n in units.items():
        _require(_is_int(n) and n >= 1, mpath, f"{where}: units of {name} must be a positive integer")
        idx = kept[name]
        _require(isinstance(idx, list) and 0 < len(idx) == len(set(map(repr, idx)))
                 and all(_is_int(k) and 0 <= k < n for k in idx), mpath,
                 f"{where}: kept units of {name} must be distinct integers in 0..{n - 1}")


#: Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def stored_elements(wfile: Path) -> int:
    """Elements the safetensors file holds, read from its header; every tensor's span is checked against
    its shape and the file's size, so a header cannot claim more than the file holds."""
    size = wfile.stat().st_size
    bad = CheckpointError(f"{wfile} is not a valid safetensors file")
    with open(wfile, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise bad
        try:
            header = load_json(f.read(n), wfile, CheckpointError)
        except CheckpointError:
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    total = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        shape, span = (t.get("shape"), t.get("data_offsets")) if isinstance(t, dict) else (None, None)
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape) and isinstance(span, list)
                and len(span) == 2 and all(_is_int(x) for x in span) and t.get("dtype") in DTYPE_BYTES):
            raise bad
        numel = math.prod(shape)
        if not 0 <= span[0] <= span[1] <= size - 8 - n or span[1] - span[0] != numel * DTYPE_BYTES[t["dtype"]]:
            raise bad
        total += numel
    return total


def _check_sizes(info: "SlimInfo", wfile: Path) -> None:
    """Before allocating: the structure the manifest describes (built on the meta device, no memory)
    has about as many parameters as the weights file holds. A guard against an implausible manifest, not the
    exact check (the strict load is): a parameter that loads with a default where the weights lack it (BLIP's
    ITC temperature in an earlier checkpoint) is within the slack."""
    import torch

    stored = stored_elements(wfile)
    with torch.device("meta"):
        model, _ = build_structure(info)
    wanted = sum(p.numel() for p in model.parameters())
    if wanted > stored + max(1024, stored // 100):
        raise CheckpointError(f"{wfile.parent}: the manifest describes {wanted:,} parameters, the weights file "
                              f"holds {stored:,} values")


def load_slim(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the slim model saved in ``path``; verify the weights' hash; load strictly."""
    path = Path(path)
    manifest = read_manifest(path)
    wfile = member(path, manifest["weights"].get("file", WEIGHTS), "weights file", CheckpointError)
    if not wfile.is_file():
        raise CheckpointError(f"{path}: weights file {wfile.name} is missing")
    digest = sha256_file(wfile)
    if digest != manifest["weights"].get("sha256"):
        raise CheckpointError(
            f"{wfile} does not match the manifest (sha256 differs): the file is truncated, corrupt or was replaced"
        )
    try:
        info = info_from_manifest(manifest)
        check_config_dict(info.base_config, path / MANIFEST, CheckpointError, stored_elements(wfile))
        _check_sizes(info, wfile)
        model, _adapter = build_structure(info)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
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
        scoring=dict(manifest.get("scoring", {})),
    )
