"""Tasks (loss + metric + batching), chosen per family by the adapter or by the families a task names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters.base import TaskHooks
from ..errors import ConfigError, UnsupportedModelError, UpopError
from ..run.options import scoring_names, task_option
from . import chat, classification, generation, reasoning, retrieval  # noqa: F401  (registration)
from .base import Preprocessor, Task, declaring, family_tasks, implementation, register_task, task_class, task_names


def task_for(adapter: TaskHooks, task: str) -> type[Task]:
    """The implementation of ``task`` for the adapter's family, or one line saying what the family does."""
    key = implementation(adapter, task)
    if key is None:
        raise UnsupportedModelError(
            f"{adapter.family} models cannot do task {task!r}; they do: {', '.join(family_tasks(adapter))}")
    return task_class(key)


def options_not_taken(adapter: TaskHooks, task: str) -> dict[str, list[str]]:
    """Each task option that ``task`` of this family does not declare → the titles of the tasks that do ({} for a
    task the family cannot do: the run says so itself)."""
    try:
        mine = {o.name for o in task_for(adapter, task).task_options}
    except UpopError:
        return {}
    return {name: users for name, users in declaring().items() if name not in mine}


def trains(adapter: TaskHooks, cls: type[Task], model_class: str) -> bool:
    """Whether a model of ``model_class`` is one the task trains (its adapter maps the class to the task, or
    the task names the class); evaluation-only tasks take any."""
    return not cls.trainable or adapter.classes.get(model_class) == cls.name or model_class in cls.model_classes


def make_task(adapter: TaskHooks, task: str, prep: Preprocessor, data_dir: str | Path, model: Any = None, *,
              workers: int | None = None, cache_gb: float | None = None, **kw: Any) -> Task:
    """The implementation of ``task`` for the adapter's family (and the model's class, when given).

    ``workers``: DataLoader worker processes per rank that decode images (0: in this process; None: a
    share of the node's cores, none for sets of at most 2000 images). ``cache_gb``: the cap of the uint8
    pixel cache per process, in GiB (0: no cache; None: 1 GiB for sets of at most 2000 images, else none).
    """
    cls = task_for(adapter, task)
    if model is not None and not trains(adapter, cls, type(model).__name__):
        own = adapter.classes.get(type(model).__name__)
        raise UnsupportedModelError(f"{type(model).__name__} cannot do task {task!r}; it does {own!r}")
    return cls(adapter, prep, data_dir, model=model, workers=workers, cache_gb=cache_gb, **kw)


def default_task(adapter: TaskHooks, model: Any) -> str:
    return adapter.classes[type(model).__name__]


def model_class_for(adapter: TaskHooks, task: str, archs: list[str]) -> str | None:
    """The model class to load for a task that names the classes it trains (``Task.model_classes``): the one the
    model's config names (``archs``) when the task trains it, else the first of the family's it trains; None
    when there is none (the adapter's own map then decides)."""
    key = implementation(adapter, task)
    fits = [name for name in adapter.classes if key is not None and name in task_class(key).model_classes]
    if archs:
        return archs[0] if archs[0] in fits else None
    return fits[0] if fits else None


def scoring_options(values: dict[str, Any]) -> dict[str, Any]:
    """The values of ``values`` that say how the model is scored (task options marked ``scores``), set ones only:
    a slim checkpoint keeps them so that ``upop eval`` and its exports score it as the run did."""
    names = scoring_names()
    return {k: v for k, v in sorted(values.items()) if v is not None and k in names}


def check_scoring(values: Any) -> None:
    """Recorded scoring options read back from a file: an object of known scoring options, each within its rule."""
    if not isinstance(values, dict):
        raise ConfigError(f"scoring must be an object, got {values!r}")
    for name, value in values.items():
        opt = task_option(name)
        if opt is None or not opt.scores:
            raise ConfigError(f"scoring option {name!r} is not one of {', '.join(scoring_names())}")
        if type(value) is not opt.type:  # a bool is no int here
            raise ConfigError(f"scoring option {name} must be {opt.rule.what}, got {value!r}")
        opt.rule.check(f"scoring option {name}", value, required=True)


__all__ = ["default_task", "make_task", "model_class_for", "Preprocessor", "register_task", "Task", "task_for",
           "task_names", "trains"]
