"""Options shared by several commands, defined once."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from upop.errors import ConfigError
from upop.run.options import MAX_INT, MAX_SEED, Option, Rule, compress_options  # noqa: F401  (MAX_*: for the commands)
from upop.run.options import at_least as _at_least
from upop.run.options import check_values as checked

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def compress_table() -> tuple[Option, ...]:
    """``upop compress``'s options: the library's table, with the registered tasks' own."""
    import upop.tasks  # noqa: F401  (the tasks declare their options as they register)

    return compress_options()


def compress_keys() -> set[str]:
    return {o.name for o in compress_table()}


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
    known = compress_keys()
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    check_values(data, lambda name: f"{path}: {name}")
    return data


def at_least(lo: int) -> Callable[[Any], bool]:
    return _at_least(lo).ok


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_values(values: dict[str, Any], label: Callable[[str], str] = flag) -> None:
    """One validation for every option, from the command line or a TOML file: type and range, one line
    naming the option (``label(name)``: the flag, or the file and key)."""
    compress_table()
    checked(values, label)


def check(name: str, value: Any, what: str, ok: Callable[[Any], bool]) -> None:
    """One option of another command: ``name`` is its flag."""
    Rule(what, ok).check(name, value)


def merge(flags: dict[str, Any], file_opts: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A flag given on the command line wins over the file, which wins over the default."""
    out = dict(defaults)
    out.update({k: v for k, v in file_opts.items() if v is not None})
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def typer_option(opt: Option) -> Any:
    """The Typer option of one table entry (unset: None, so a TOML file or a recipe can fill it)."""
    return typer.Option(None, *opt.decls(), help=opt.help)


def with_options(options: Callable[[], tuple[Option, ...]]):
    """A command whose leading parameters are the table's options: ``fn(values, **rest)`` gets them as one dict
    (name → value or None) and its own parameters as they are. The table is read each time the command line is
    parsed, so an option a task declares after this module was imported is a flag too."""
    return lambda fn: TableCommand(fn, options)


class TableCommand:
    """The callable Typer registers: its signature (Typer's parameters) is built from the table when asked."""

    def __init__(self, fn: Callable[..., Any], options: Callable[[], tuple[Option, ...]]):
        functools.update_wrapper(self, fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
        self.fn, self.options = fn, options

    def table(self) -> list[Option]:
        return [o for o in self.options() if o.flagged]

    @property
    def __signature__(self) -> inspect.Signature:
        own = [p for name, p in inspect.signature(self.fn).parameters.items() if name != "values"]
        return inspect.Signature([inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    default=typer_option(o), annotation=Optional[o.type])
                                  for o in self.table()] + own)

    @property
    def __annotations__(self) -> dict[str, Any]:  # type: ignore[override]
        return {p.name: p.annotation for p in self.__signature__.parameters.values()}

    def __call__(self, **kw: Any) -> Any:
        return self.fn({o.name: kw.pop(o.name, None) for o in self.table()}, **kw)
