"""Options shared by several commands, defined once."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upop.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

COMPRESS_KEYS = {
    "model", "ratio", "task", "data", "granularity", "profile", "search_epochs", "retrain_epochs", "batch_size",
    "lr", "device", "seed", "out", "update_every", "eval_limit", "lambda_attn", "lambda_mlp", "target_latency",
    "checkpoint_every", "grad_accum", "max_steps", "workers", "cache_gb", "latency",
    "search_lr_schedule", "weight_decay", "augment", "recipe", "k_test", "momentum",
    "distill", "distill_weight", "distill_temperature", "distill_search", "teacher",
    "rerank", "cost_weights",
}


def read_toml(path: Path | None) -> dict[str, Any]:
    """Options from a TOML file (the same names as the flags, with underscores)."""
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    section = data.get("compress", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [compress] must be a table of options")
    data = {k.replace("-", "_"): v for k, v in section.items()}
    unknown = sorted(set(data) - COMPRESS_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(COMPRESS_KEYS))}")
    check_values(data, lambda name: f"{path}: {name}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


#: Integers beyond these overflow what they feed (a seed: numpy's 32 bits; the rest: C ints in torch).
MAX_SEED = 2**32 - 1
MAX_INT = 2**31 - 1


def at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and lo <= v <= MAX_INT


#: What every option of ``upop compress`` (flag or TOML key) must be: (description, test).
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model": ("a model name or folder", _text),
    "ratio": ("strictly between 0 and 1", lambda v: _is_num(v) and 0 < v < 1),
    "task": ("a task name", _text),
    "data": ("a folder", _text),
    "granularity": ("one of dim, head", lambda v: v in ("dim", "head")),
    "profile": ("a profile name or file", _text),
    "target_latency": ("a number of milliseconds > 0", lambda v: _is_num(v) and v > 0),
    "search_epochs": ("an integer >= 1", at_least(1)),
    "retrain_epochs": ("an integer >= 0", at_least(0)),
    "batch_size": ("an integer >= 1", at_least(1)),
    "lr": ("a number >= 0", lambda v: _is_num(v) and v >= 0),
    "update_every": ("an integer >= 1", at_least(1)),
    "eval_limit": ("an integer >= 1", at_least(1)),
    "device": ("auto, cpu, cuda or cuda:N", lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)),
    "seed": (f"an integer in 0..{MAX_SEED}", lambda v: _is_int(v) and 0 <= v <= MAX_SEED),
    "out": ("a folder", _text),
    "lambda_attn": ("a number >= 0", lambda v: _is_num(v) and v >= 0),
    "lambda_mlp": ("a number >= 0", lambda v: _is_num(v) and v >= 0),
    "checkpoint_every": ("an integer >= 0", at_least(0)),
    "grad_accum": ("an integer >= 1", at_least(1)),
    "max_steps": ("an integer >= 1", at_least(1)),
    "workers": ("an integer >= 0", at_least(0)),
    "cache_gb": ("a number of GiB >= 0", lambda v: _is_num(v) and v >= 0),
    "latency": ("true or false", lambda v: isinstance(v, bool)),
    "search_lr_schedule": ("one of constant, cosine", lambda v: v in ("constant", "cosine")),
    "weight_decay": ("a number >= 0", lambda v: _is_num(v) and v >= 0),
    "augment": ("one of none, default", lambda v: v in ("none", "default")),
    "recipe": ("a recipe name (upop recipes list) or none", _text),
    "k_test": ("an integer >= 1", at_least(1)),
    "momentum": ("true or false", lambda v: isinstance(v, bool)),
    "distill": ("one of off, logits, features, both", lambda v: v in ("off", "logits", "features", "both")),
    "distill_weight": ("a number >= 0", lambda v: _is_num(v) and v >= 0),
    "distill_temperature": ("a number > 0", lambda v: _is_num(v) and v > 0),
    "distill_search": ("true or false", lambda v: isinstance(v, bool)),
    "teacher": ("a model name or folder", _text),
    "rerank": ("one of logit, prob", lambda v: v in ("logit", "prob")),
    "cost_weights": ("one of true, paper", lambda v: v in ("true", "paper")),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(values: dict[str, Any], label: Callable[[str], str] = flag) -> None:
    """One validation for every option, from the command line or a TOML file: type and range, one line
    naming the option (``label(name)``: the flag, or the file and key)."""
    for name, value in values.items():
        if value is None or name not in RULES:
            continue
        what, ok = RULES[name]
        if _is_int(value) and value > MAX_INT and what.startswith("an integer >="):
            what = f"at most {MAX_INT}"
        if not ok(value):
            raise ConfigError(f"{label(name)} must be {what}, got {value!r}")


def check(name: str, value: Any, what: str, ok: Callable[[Any], bool]) -> None:
    """One option of another command: ``name`` is its flag."""
    if value is not None and not ok(value):
        if _is_int(value) and value > MAX_INT and what.startswith("an integer >="):
            what = f"at most {MAX_INT}"
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def merge(flags: dict[str, Any], file_opts: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A flag given on the command line wins over the file, which wins over the default."""
    out = dict(defaults)
    out.update({k: v for k, v in file_opts.items() if v is not None})
    out.update({k: v for k, v in flags.items() if v is not None})
    return out
