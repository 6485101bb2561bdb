"""Hardware profiles: the schema and the loader.

A profile names a target's runtime and precision, its datasheet peaks, the size multiples its
fast kernels want, reference shapes, and a latency model (a roofline, or a table measured by
``upop profiles calibrate``). Loading validates every field and rejects unknown keys, listing
every problem at once. The shipped profiles are TOML files in the ``upop.profiles`` package
(the repository's ``profiles/`` folder), read here as package data.
"""

from __future__ import annotations

import re

from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ProfileError  # noqa: F401  (defined with every error, raised and re-exported here)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


#: the package whose folder holds the shipped profile files
SHIPPED = "upop.profiles"



@dataclass(frozen=True)
class Alignment:
    mlp_multiple: int = 1
    head_dim_multiple: int = 1
    head_dim_min: int = 1
    head_dim_max: int = 4096
    whole_heads: bool = False


@dataclass(frozen=True)
class Peaks:
    fp32_tflops: float
    fp16_tflops: float
    memory_gbps: float
    int8_tops: float | None = None


@dataclass(frozen=True)
class Shapes:
    batch: int = 1
    text_tokens: int = 32


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    runtime: str
    device: str
    precision: str
    peaks: Peaks
    alignment: Alignment
    shapes: Shapes
    latency_model: str = "roofline"
    efficiency: float = 0.5  # share of the datasheet peaks that real kernels reach
    tensorrt_major: int | None = None
    source: str = ""
    table: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_param(self) -> int:
        return {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[self.precision]

    @property
    def peak_flops(self) -> float:
        t = {"fp32": self.peaks.fp32_tflops, "fp16": self.peaks.fp16_tflops, "bf16": self.peaks.fp16_tflops,
             "int8": self.peaks.int8_tops or self.peaks.fp16_tflops}[self.precision]
        return t * 1e12 * self.efficiency

    @property
    def bandwidth(self) -> float:
        return self.peaks.memory_gbps * 1e9 * self.efficiency


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "": {"name": str, "description": str, "runtime": str, "device": str, "precision": str, "latency_model": str,
         "efficiency": (int, float), "tensorrt_major": int, "peaks": dict, "alignment": dict, "shapes": dict,
         "table": dict},
    "peaks": {"fp32_tflops": (int, float), "fp16_tflops": (int, float), "memory_gbps": (int, float),
              "int8_tops": (int, float)},
    "alignment": {"mlp_multiple": int, "head_dim_multiple": int, "head_dim_min": int, "head_dim_max": int,
                  "whole_heads": bool},
    "shapes": {"batch": int, "text_tokens": int},
}
_REQUIRED = {"": ("name", "runtime", "device", "precision", "peaks"), "peaks": ("fp32_tflops", "fp16_tflops", "memory_gbps")}
#: A runtime is named, not listed here: the runtimes are registered by the exporters, which the core does not
#: import; the CLI checks the name against them (``upop profiles validate``), the core only its form.
RUNTIME_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_CHOICES = {"device": ("cuda", "cpu"),
            "precision": ("fp32", "fp16", "bf16", "int8"), "latency_model": ("roofline", "table")}


def validate(data: dict[str, Any], origin: str = "profile", runtimes: Collection[str] | None = None) -> list[str]:
    """Every problem with a profile mapping (empty when it is valid); ``runtimes``: the names registered where it
    is checked (the CLI passes the exporters'), else only the runtime name's form is checked."""
    errors = []
    for section, schema in _SCHEMA.items():
        block = data if section == "" else data.get(section, {})
        if not isinstance(block, dict):
            errors.append(f"[{section}] must be a table")
            continue
        where = f"[{section}] " if section else ""
        for key in sorted(set(block) - set(schema)):
            errors.append(f"{where}unknown key {key!r}")
        for key in _REQUIRED.get(section, ()):
            if key not in block:
                errors.append(f"{where}missing key {key!r}")
        for key, typ in schema.items():
            if key in block and (not isinstance(block[key], typ) or (typ is int and isinstance(block[key], bool))):
                errors.append(f"{where}{key} must be {getattr(typ, '__name__', 'a number')}, got {block[key]!r}")
    if isinstance(data.get("runtime"), str) and runtimes is not None and data["runtime"] not in runtimes:
        errors.append(f"runtime must be one of {', '.join(sorted(runtimes))}, got {data['runtime']!r}")
    elif isinstance(data.get("runtime"), str) and not RUNTIME_NAME.fullmatch(data["runtime"]):
        errors.append(f"runtime must be a runtime's name (lowercase, as upop export --format names it), got "
                      f"{data['runtime']!r}")
    for key, choices in _CHOICES.items():
        if key in data and data[key] not in choices:
            errors.append(f"{key} must be one of {', '.join(choices)}, got {data[key]!r}")
    for key in ("fp32_tflops", "fp16_tflops", "memory_gbps"):
        v = data.get("peaks", {}).get(key) if isinstance(data.get("peaks"), dict) else None
        if isinstance(v, (int, float)) and v <= 0:
            errors.append(f"[peaks] {key} must be > 0")
    al = data.get("alignment", {}) if isinstance(data.get("alignment"), dict) else {}
    for key in ("mlp_multiple", "head_dim_multiple", "head_dim_min", "head_dim_max"):
        if isinstance(al.get(key), int) and al[key] < 1:
            errors.append(f"[alignment] {key} must be >= 1")
    if isinstance(al.get("head_dim_min"), int) and isinstance(al.get("head_dim_max"), int) \
            and al["head_dim_min"] > al["head_dim_max"]:
        errors.append("[alignment] head_dim_min is above head_dim_max")
    eff = data.get("efficiency")
    if isinstance(eff, (int, float)) and not 0 < eff <= 1:
        errors.append("efficiency must be in (0, 1]")
    if data.get("latency_model") == "table" and not data.get("table"):
        errors.append("latency_model = 'table' needs a [table] of measured latencies")
    return [f"{origin}: {e}" for e in errors]


def parse(data: dict[str, Any], origin: str = "profile", runtimes: Collection[str] | None = None) -> Profile:
    errors = validate(data, origin, runtimes)
    if errors:
        raise ProfileError("invalid profile:\n  " + "\n  ".join(errors))
    return Profile(
        name=data["name"], description=data.get("description", ""), runtime=data["runtime"], device=data["device"],
        precision=data["precision"], peaks=Peaks(**data["peaks"]), alignment=Alignment(**data.get("alignment", {})),
        shapes=Shapes(**data.get("shapes", {})), latency_model=data.get("latency_model", "roofline"),
        efficiency=float(data.get("efficiency", 0.5)), tensorrt_major=data.get("tensorrt_major"), source=origin,
        table=data.get("table", {}))


def read_file(path: str | Path, runtimes: Collection[str] | None = None) -> Profile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not valid TOML: {exc}") from None
    return parse(data, str(path), runtimes)


def available() -> list[str]:
    """Names of the profile files shipped in this package."""
    root = resources.files(SHIPPED)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load(name_or_path: str) -> Profile:
    """A shipped profile by name, or a profile file."""
    if name_or_path in available():
        root = resources.files(SHIPPED)
        return parse(tomllib.loads((root / f"{name_or_path}.toml").read_text()), name_or_path)
    if Path(name_or_path).is_file():
        return read_file(name_or_path)
    raise ProfileError(f"unknown profile {name_or_path!r}; shipped profiles: {', '.join(available())}, "
                       "or pass a profile file")
