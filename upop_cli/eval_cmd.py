from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .out import console
from rich.table import Table

from .options import MAX_SEED, at_least, check

#: Beyond these the shapes set is no demo: an image of 4096² pixels is 48 MiB decoded, a split of 10⁶ images hours.
MAX_SHAPES_SIZE = 4096
MAX_IMAGES = 1_000_000


def is_export(path: str) -> bool:
    """A folder written by ``upop export`` (a folder one of the runtimes says is its export)."""
    from upop.exporters import backends

    p = Path(path)
    return p.is_dir() and any(b.owns(p) for b in backends())


def run(model: str, task: str | None, data: str | None, split: str, batch_size: int, limit: int | None,
        device: str, as_json: bool, allow_outside_data: bool = False, runtime: str | None = None,
        scoring: dict[str, Any] | None = None) -> None:
    """``scoring``: the task options that change how the model is scored (``--k-test``, ``--rerank``,
    ``--max-new-tokens``), given only when set: as ``upop compress`` scored the run, not the defaults."""
    from upop.api import open_model, resolve_device, setup_task
    from upop.datasets.readers import outside_data_allowed
    from upop.tasks import default_task
    from upop.errors import ConfigError
    from upop.exporters import canonical

    check("--batch-size", batch_size, "an integer >= 1", at_least(1))
    check("--limit", limit, "an integer >= 1", at_least(1))
    if is_export(model):
        with outside_data_allowed(allow_outside_data):
            return run_export(model, task, data, split, batch_size, limit, device, as_json, canonical(runtime or "onnxruntime"),
                              scoring)
    if runtime is not None:
        raise ConfigError(f"{model} is not an export folder (written by upop export), which --runtime evaluates")
    from upop.models.hub import network_rule

    dev = resolve_device(device)
    network_rule(model)
    src = open_model(model, task)
    task_name = task or default_task(src.adapter, src.model)
    refuse_unused(src.adapter, task_name, scoring or {})
    scoring = with_recorded(src.adapter, task_name, src.info.scoring, scoring or {}, model)
    src.model.to(dev)
    with outside_data_allowed(allow_outside_data):
        ts = setup_task(src, task, data, None, batch_size, 0, limit, **(scoring or {}))
        ts.task.eval_batch_size = batch_size  # the task evaluates in batches of this size
        metrics = ts.task.evaluate(src.model, split, limit)
    if as_json:
        print(json.dumps({"model": model, "task": ts.task.name, "split": split, "metrics": metrics}, indent=2))
        return
    _show(f"{model}: {ts.task.name} on {split} (primary: {ts.task.primary})", metrics)


def run_export(export_dir: str, task: str | None, data: str | None, split: str, batch_size: int, limit: int | None,
               device: str, as_json: bool, runtime: str, scoring: dict[str, Any] | None = None) -> None:
    """The task metrics of an exported artifact, every forward run by it."""
    from upop.exporters.evaluate import evaluate_artifact, open_artifact

    from upop.adapters import get_adapter
    from upop.errors import ExportFolderError, UpopError

    artifact = open_artifact(export_dir, runtime, device)
    if scoring:
        try:
            adapter = get_adapter(artifact.record.family)
        except UpopError:
            raise ExportFolderError(f"export.json names an unknown model family {artifact.record.family!r} "
                                    "(damaged?)") from None
        refuse_unused(adapter, task or artifact.record.task, scoring)
    metrics = evaluate_artifact(artifact, data=data, split=split, batch_size=batch_size, limit=limit, task=task,
                                scoring=scoring)
    name = task or artifact.record.task
    providers = artifact.providers()
    if as_json:
        print(json.dumps({"export": export_dir, "runtime": runtime, "providers": providers, "task": name,
                          "split": split, "metrics": metrics}, indent=2))
        return
    _show(f"{export_dir} ({runtime}: {', '.join(providers)}): {name} on {split}", metrics)


def with_recorded(adapter: Any, task: str, recorded: dict[str, Any], given: dict[str, Any], where: str) -> dict[str, Any]:
    """The scoring options a slim checkpoint recorded (those ``task`` takes) under the ones given; the recorded ones
    in use are said in one line on stderr, so a score is never read without knowing how it was made."""
    from upop.tasks import options_not_taken

    not_taken = options_not_taken(adapter, task)
    used = {k: v for k, v in recorded.items() if k not in not_taken and k not in given}
    if used:
        flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in used.items())
        console(stderr=True).print(f"scored as its run was: {flags} (recorded in {where}; a flag overrides)",
                                   markup=False, highlight=False)
    return {**used, **given}


def refuse_unused(adapter: Any, task: str, scoring: dict[str, Any]) -> None:
    """One line, before any work, for a scoring flag this model's task does not take (and which tasks do)."""
    from upop.errors import ConfigError
    from upop.tasks import options_not_taken

    not_taken = options_not_taken(adapter, task)
    for name in scoring:
        if name in not_taken:
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to this {adapter.family} {task} model "
                              f"(only {' and '.join(not_taken[name])} uses it)")


def _show(title: str, metrics: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if k != "primary":
            table.add_row(k, f"{v:.2f}")
    console().print(table)


def run_datasets_shapes(out: Path, train: int, val: int, test: int, seed: int, image_size: int, quiet: bool) -> None:
    from upop.datasets import shapes
    from upop.errors import OutputExistsError
    from upop.run.safety import check_replace, output_dir

    for name, value in (("--train", train), ("--val", val), ("--test", test)):
        check(name, value, f"an integer in 1..{MAX_IMAGES}", lambda v: at_least(1)(v) and v <= MAX_IMAGES)
    check("--seed", seed, f"an integer in 0..{MAX_SEED}", lambda v: at_least(0)(v) and v <= MAX_SEED)
    check("--image-size", image_size, f"an integer in 16..{MAX_SHAPES_SIZE} (pixels)",
          lambda v: at_least(16)(v) and v <= MAX_SHAPES_SIZE)
    if out.exists() and not out.is_dir() and not out.is_symlink():
        raise OutputExistsError(f"--out {out} is a file; the shapes set is a folder: choose another --out")
    check_replace(out, overwrite=True, kind="shapes")  # a link, the cache, anything upop did not write: refused
    if out.is_dir() and any(out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not empty; choose another --out")
    with output_dir(out, kind="shapes") as tmp:  # a failure or Ctrl-C leaves no half-written folder
        shapes(tmp, train=train, val=val, test=test, seed=seed, image_size=image_size)
    if not quiet:
        console().print(f"wrote the shapes set to {out} (train {train}, val {val}, test {test}, seed {seed})")
