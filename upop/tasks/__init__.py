"""Tasks (loss + metric + batching), chosen per family by the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError
from . import classification, generation, reasoning, retrieval  # noqa: F401  (registration)
from .base import Preprocessor, Task, task_class

TASK_NAMES = ("retrieval", "caption", "vqa", "classification", "nlvr")


def make_task(adapter: Any, task: str, prep: Preprocessor, data_dir: str | Path, model: Any = None, *,
              workers: int | None = None, cache_gb: float | None = None, **kw: Any) -> Task:
    """The implementation of ``task`` for the adapter's family (and the model's class, when given).

    ``workers``: DataLoader worker processes per rank that decode images (0: in this process; None: a
    share of the node's cores, none for sets of at most 2000 images). ``cache_gb``: the cap of the uint8
    pixel cache per process, in GiB (0: no cache; None: 1 GiB for sets of at most 2000 images, else none).
    """
    key = adapter.tasks.get(task)
    if key is None:
        raise UnsupportedModelError(
            f"{adapter.family} models cannot do task {task!r}; they do: {', '.join(sorted(adapter.tasks))}")
    cls = task_class(key)
    if model is not None and cls.trainable:
        own = adapter.classes.get(type(model).__name__)
        if own != task:
            raise UnsupportedModelError(f"{type(model).__name__} cannot do task {task!r}; it does {own!r}")
    return cls(adapter, prep, data_dir, model=model, workers=workers, cache_gb=cache_gb, **kw)


def default_task(adapter: Any, model: Any) -> str:
    return adapter.classes[type(model).__name__]


__all__ = ["default_task", "make_task", "Preprocessor", "Task", "TASK_NAMES"]
