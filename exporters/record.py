"""What ``export.json`` records so that an export is evaluated as ``upop eval`` evaluates its model (written by
``upop export``, read back and checked by ``upop eval EXPORT_DIR``: the folder may come from anywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from upop.errors import ExportFolderError

__all__ = ["Record", "evaluation_record", "read_record"]

#: task options an export may record (what ``upop eval MODEL`` takes from a demo), with their types
_OPTION_TYPES: dict[str, type] = {"k_test": int, "max_new_tokens": int, "prompt": str, "rerank": str}
_PREP_TYPES: dict[str, type] = {"max_length": int, "pad_to_max_length": bool}


def evaluation_record(source: str | Path, model: nn.Module, adapter: Any) -> dict[str, Any]:
    """What ``export.json`` records so that the artifact is evaluated as ``upop eval`` evaluates the model: the
    demo it comes from (its data and task options), the task options (a slim checkpoint's recorded scoring over
    the demo's), and the preprocessor's options."""
    from upop.models.demo import DEMOS

    demo = _demo_name(source, model)
    info = getattr(model, "_upop_info", None)
    scoring = {k: v for k, v in getattr(info, "scoring", {}).items() if k in _OPTION_TYPES}
    return {"demo": demo, "task_options": {**(dict(DEMOS[demo].task_options) if demo else {}), **scoring},
            "preprocessor": adapter.preprocessor_options(model)}


def _demo_name(source: str | Path, model: nn.Module) -> str | None:
    from upop.models.demo import DEMO_ROOT, is_demo

    info = getattr(model, "_upop_info", None)  # a slim checkpoint: the model it was compressed from
    for name in (str(source), getattr(info, "source", None)):
        if isinstance(name, str) and is_demo(name):
            return name
    path = Path(source)
    if path.is_dir() and path.resolve().parent == DEMO_ROOT.resolve() and is_demo(path.name):
        return path.name  # a demo name resolved to its installed folder
    return None


@dataclass
class Record:
    task: str
    family: str
    model_class: str
    demo: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    preprocessor: dict[str, Any] = field(default_factory=dict)


def _typed(values: Any, types: dict[str, type], what: str, where: Path) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ExportFolderError(f"{where} is damaged ({what} must be an object)")
    for k, v in values.items():
        kind = types.get(k)
        if kind is None or type(v) is not kind:  # bool is not accepted where an int is meant
            raise ExportFolderError(f"{where} is damaged ({what} {k}={v!r} is not a known "
                                    f"{' or '.join(sorted(types))} setting of the right type)")
    return dict(values)


def read_record(manifest: dict[str, Any], where: Path) -> Record:
    """The evaluation record of a checked ``export.json`` (exports written before it was recorded: the task,
    no demo, no options)."""
    from upop.models.demo import is_demo

    rec = manifest.get("evaluation", {})
    if not isinstance(rec, dict):
        raise ExportFolderError(f"{where} is damaged (evaluation must be an object)")
    demo = rec.get("demo")
    if demo is not None and not (isinstance(demo, str) and is_demo(demo)):
        raise ExportFolderError(f"{where} is damaged (evaluation.demo {demo!r} is not a built-in demo)")
    family, model_class = manifest.get("family"), manifest.get("model_class")
    if not isinstance(family, str) or not isinstance(model_class, str):
        raise ExportFolderError(f"{where} is damaged (no family or model_class)")
    return Record(manifest["task"], family, model_class, demo,
                  _typed(rec.get("task_options", {}), _OPTION_TYPES, "evaluation.task_options", where),
                  _typed(rec.get("preprocessor", {}), _PREP_TYPES, "evaluation.preprocessor", where))


