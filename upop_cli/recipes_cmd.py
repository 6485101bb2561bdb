"""``upop recipes list|show`` and the recipe a ``upop compress`` run starts from (docs/recipes.md)."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from .options import check_values, compress_keys
from .out import console, print_json

def checked(recipe: Any, ratio: float | None = None) -> dict[str, Any]:
    """The options of the recipe's row nearest ``ratio`` (its [compress] row without one), held to the rules of
    flags and ``--config`` files (one line on a bad value)."""
    from upop.errors import ConfigError

    for row in recipe.rows:
        check_values({k.replace("-", "_"): v for k, v in recipe.rows[row].items()},
                     lambda name, row=row: f"recipe {recipe.name}, row {row:g}: {name}")
    opts = {k.replace("-", "_"): v for k, v in recipe.options_for(ratio).items()}
    unknown = sorted(set(opts) - compress_keys() - {"recipe"})
    if unknown or "recipe" in opts:
        raise ConfigError(f"recipe {recipe.name}: unknown option(s) {', '.join(unknown or ['recipe'])}")
    check_values(opts, lambda name: f"recipe {recipe.name}: {name}")
    return opts


def recipes_list() -> None:
    from upop.run.recipe import all_recipes

    table = Table(title="Recipes: upop compress --recipe NAME (by default chosen from the data's annotation files)")
    for col in ("name", "family", "task", "dataset", "λ attn / mlp", "lr", "wd", "batch", "epochs s/r", "update every"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("name", "family", "task", "dataset") else "right")
    for r in all_recipes():
        o = checked(r)
        table.add_row(r.name, r.family, r.task, r.dataset, f"{o['lambda_attn']:.3g} / {o['lambda_mlp']:.3g}",
                      f"{o['lr']:g}", f"{o['weight_decay']:g}", str(o["batch_size"]),
                      f"{o['search_epochs']}/{o['retrain_epochs']}", str(o["update_every"]))
    console().print(table)


def recipes_show(name: str, as_json: bool) -> None:
    from upop.run.recipe import load_recipe

    r = load_recipe(name)
    checked(r)
    if as_json:
        print_json(r.to_dict())
        return
    table = Table(title=f"{r.name}: {r.family} {r.task} on {r.dataset} ({r.image_size} px, {r.gpus} GPUs in the paper)")
    table.add_column("option")
    table.add_column("value", justify="right")
    for k, v in r.options.items():
        table.add_row(k, str(v).lower() if isinstance(v, bool) else str(v))
    for row, changed in r.rows.items():
        for k, v in changed.items():
            table.add_row(f"{k} (ratio {row:g})", str(v).lower() if isinstance(v, bool) else str(v))
    metric = r.paper.get("metric")
    for k, v in r.paper.items():
        if k != "metric":
            table.add_row(f"paper {metric} ({'unpruned' if k == 'base' else f'ratio {k}'})", str(v))
    table.caption = f"identified by {' or '.join(r.annotations)} in the data folder"
    console().print(table)


# ---- the recipe of a compress run -----------------------------------------------------------------
def recipe_options(model: str, data: str | None, task: str | None, name: str | None, main: bool,
                   ratio: float | None = None) -> dict[str, Any]:
    """The options of the run's recipe: ``name`` (``none``: no recipe), else the one the data folder's
    annotation files identify for the model's family and task (said in one line); the demos use none.
    Of a recipe with rows per ratio, the row nearest ``ratio`` (said in one line)."""
    from upop.models.demo import DEMOS
    from upop.run.recipe import NO_RECIPE, detect, load_recipe

    if name == NO_RECIPE or (name is None and (model in DEMOS or data is None)):
        return {}
    if name is not None:
        recipe = load_recipe(name)
        family, run_task = _family_and_task(model, task)
        from upop.errors import ConfigError

        if family is not None and family != recipe.family:
            raise ConfigError(f"recipe {recipe.name} is for {recipe.family} models; {model} is a {family} model "
                              "(upop recipes list)")
        if run_task is not None and run_task != recipe.task:
            raise ConfigError(f"recipe {recipe.name} is for the {recipe.task} task; this run does {run_task} "
                              "(upop recipes list)")
    else:
        family, task = _family_and_task(model, task)
        recipe = detect(family, task, data) if family is not None and task is not None else None
        if recipe is None:
            return {}
        if main:
            typer.echo(f"recipe: {recipe.name} ({recipe.dataset} annotations in {data}; --recipe none turns it off)",
                       err=True)
    opts = checked(recipe, ratio)
    if main:
        _say_image_size(model, recipe)
        if recipe.rows:
            rows = ", ".join(f"{r:g}" for r in sorted([recipe.ratio, *recipe.rows]))
            typer.echo(f"recipe row: ratio {recipe.row_for(ratio):g} of {recipe.name} (rows {rows}): "
                       f"{opts['search_epochs']} search and {opts['retrain_epochs']} retrain epochs", err=True)
    return opts


def _family_and_task(model: str, task: str | None) -> tuple[str | None, str | None]:
    """From the model's config alone (no weights); None where it cannot be read (the run says why later)."""
    from upop.adapters import get_adapter
    from upop.errors import UpopError
    from upop.models.hub import load_config, network_rule, resolve

    network_rule(model)  # the run's own rule, applied first here: at most one probe of the hub
    try:
        config = load_config(resolve(model))
        adapter = get_adapter(config)
    except UpopError:
        return None, None
    if task is not None:
        return adapter.family, task
    names = [a for a in (getattr(config, "architectures", None) or []) if a in adapter.classes]
    return adapter.family, adapter.classes[names[0]] if names else None


def _say_image_size(model: str, recipe: Any) -> None:
    """upop keeps the model's processor size (no silent resize); one line when the paper used another."""
    size = processor_size(model)
    if recipe.image_size is not None and size is not None and size != recipe.image_size:
        typer.echo(f"note: the model's image processor gives {size} px; {recipe.name} trained at "
                   f"{recipe.image_size} px in the paper (upop keeps the processor's size)", err=True)


def processor_size(model: str) -> int | None:
    """The square side the model's image processor outputs (its crop, else its resize), if it says."""
    from upop.models.hub import load_processor, resolve

    try:
        proc = load_processor(resolve(model))
    except Exception:  # noqa: BLE001 - a note only: the run itself reports a processor it cannot load
        return None
    img = getattr(proc, "image_processor", None) or next(
        (p for p in getattr(proc, "parts", ()) if hasattr(p, "size")), None) or proc
    crop = getattr(img, "crop_size", None) if getattr(img, "do_center_crop", False) else None
    return _side(crop) or _side(getattr(img, "size", None))


def _side(size: Any) -> int | None:
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if size is None:
        return None
    h, w, short = get("height"), get("width"), get("shortest_edge")
    return int(h) if h and h == w else int(short) if short else None
