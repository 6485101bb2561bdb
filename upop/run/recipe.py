"""Recipes: the reference UPop hyperparameters per (family, task, dataset), shipped as TOML files in
``upop/recipes/`` (docs/recipes.md).

A recipe's ``[compress]`` table holds ``upop compress`` options (the CLI validates them with the same
rules as flags and ``--config`` files, and they sit below both): the row of the ratio ``ratio`` (default 0.5,
the paper's 2×). ``[rows."R"]`` tables hold what the reference's script for ratio R sets differently (its 4×
scripts train longer); a run takes the row nearest its ``--ratio``. The top level says what it is for:
the family and task, the dataset, the annotation files (or folders) that identify that dataset in a data
folder, the image size the paper trained at, and the paper's numbers (``[paper]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
#: what ``--recipe none`` (or TOML ``recipe = "none"``) means: no recipe, not even a detected one
NO_RECIPE = "none"


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    task: str
    dataset: str
    annotations: tuple[str, ...]  # any of these, relative to the data folder, identifies the dataset
    options: dict[str, Any]
    image_size: int | None = None
    gpus: int | None = None
    paper: dict[str, Any] = field(default_factory=dict)
    ratio: float = 0.5  # the ratio of the [compress] row
    rows: dict[float, dict[str, Any]] = field(default_factory=dict)  # another ratio → what its row changes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "task": self.task, "dataset": self.dataset,
                "annotations": list(self.annotations), "image_size": self.image_size, "gpus": self.gpus,
                "ratio": self.ratio, "compress": dict(self.options), "rows": {f"{r:g}": dict(o) for r, o in self.rows.items()},
                "paper": dict(self.paper)}

    def row_for(self, ratio: float | None) -> float:
        """The ratio of the row nearest ``ratio`` (ties: the smaller); the [compress] row without a ratio."""
        if ratio is None:
            return self.ratio
        return min([self.ratio, *self.rows], key=lambda r: (abs(r - float(ratio)), r))

    def options_for(self, ratio: float | None) -> dict[str, Any]:
        """The options of the row nearest ``ratio``: the [compress] table, with that row's values over it."""
        return {**self.options, **self.rows.get(self.row_for(ratio), {})}

    def matches(self, data_dir: str | Path) -> bool:
        root = Path(data_dir)
        return root.is_dir() and any((root / a).exists() for a in self.annotations)


def _read(path: Path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {path.name} is not valid TOML: {exc}") from None
    missing = [k for k in ("family", "task", "dataset", "annotations", "compress") if k not in data]
    if missing:
        raise ConfigError(f"recipe {path.name} lacks {', '.join(missing)}")
    options = data["compress"]
    if not isinstance(options, dict) or not isinstance(data["annotations"], list):
        raise ConfigError(f"recipe {path.name}: [compress] must be a table and annotations a list")
    return Recipe(name=path.stem, family=str(data["family"]), task=str(data["task"]), dataset=str(data["dataset"]),
                  annotations=tuple(str(a) for a in data["annotations"]), options=dict(options),
                  image_size=data.get("image_size"), gpus=data.get("gpus"), paper=dict(data.get("paper", {})),
                  ratio=_ratio(data.get("ratio", 0.5), path), rows=_rows(data.get("rows", {}), path))


def _ratio(value: Any, path: Path) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = float("nan")
    if isinstance(value, bool) or not 0 < r < 1:
        raise ConfigError(f"recipe {path.name}: a row's ratio must be a number strictly between 0 and 1, not {value!r}")
    return r


def _rows(rows: Any, path: Path) -> dict[float, dict[str, Any]]:
    if not isinstance(rows, dict) or not all(isinstance(v, dict) for v in rows.values()):
        raise ConfigError(f"recipe {path.name}: [rows] must hold one table of options per ratio")
    return {_ratio(k, path): dict(v) for k, v in rows.items()}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def all_recipes() -> list[Recipe]:
    return [_read(RECIPES_DIR / f"{n}.toml") for n in recipe_names()]


def load_recipe(name: str) -> Recipe:
    """The shipped recipe ``name``; an unknown name is one line listing the known ones."""
    path = RECIPES_DIR / f"{name}.toml"
    if "/" in name or "\\" in name or not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(recipe_names())} (or none)")
    return _read(path)


def detect(family: str, task: str, data_dir: str | Path | None) -> Recipe | None:
    """The recipe for the family and task whose annotation files the data folder holds (None: no match,
    or several, which is left to ``--recipe``)."""
    if data_dir is None:
        return None
    found = [r for r in all_recipes() if r.family == family and r.task == task and r.matches(data_dir)]
    return found[0] if len(found) == 1 else None
