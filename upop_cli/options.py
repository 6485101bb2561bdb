"""Options shared by several commands, defined once."""

from __future__ import annotations

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
    "checkpoint_every",
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
    data = {k.replace("-", "_"): v for k, v in data.get("compress", data).items()}
    unknown = sorted(set(data) - COMPRESS_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(COMPRESS_KEYS))}")
    return data


def merge(flags: dict[str, Any], file_opts: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A flag given on the command line wins over the file, which wins over the default."""
    out = dict(defaults)
    out.update({k: v for k, v in file_opts.items() if v is not None})
    out.update({k: v for k, v in flags.items() if v is not None})
    return out
