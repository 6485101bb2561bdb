"""What a task is: batches for training, a loss, and an evaluation with a primary metric.

A task is chosen per family by the adapter (``adapter.tasks``): the same task name can map to
different implementations (BLIP retrieval uses ITC + ITM; CLIP a contrastive loss).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..datasets.readers import DataError, open_image

_TASKS: dict[str, type["Task"]] = {}

#: Annotation file names searched for, per task, in a data folder ({split} is train/val/test).
ANNOTATION_NAMES = {
    "retrieval": ("retrieval_{split}.json", "coco_karpathy_{split}.json", "flickr30k_{split}.json", "{split}.json",
                  "retrieval_{split}.jsonl"),
    "caption": ("caption_{split}.json", "retrieval_{split}.json", "coco_karpathy_{split}.json",
                "flickr30k_{split}.json", "{split}.json"),
    "vqa": ("vqa_{split}.json", "vqa_{split}.jsonl"),
    "nlvr": ("nlvr_{split}.json", "nlvr2_{split}.json", "nlvr_{split}.jsonl"),
}


def register_task(key: str):
    def deco(cls: type["Task"]) -> type["Task"]:
        _TASKS[key] = cls
        return cls

    return deco


def task_class(key: str) -> type["Task"]:
    return _TASKS[key]


def find_annotation(data_dir: Path, task: str, split: str) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    names = [n.format(split=split) for n in ANNOTATION_NAMES[task]]
    if split == "val":  # NLVR2 and others call it dev
        names += [n.format(split="dev") for n in ANNOTATION_NAMES[task]]
    for n in names:
        if (data_dir / n).is_file():
            return data_dir / n
    raise DataError(f"{data_dir} has no {split} split for {task} (looked for {', '.join(names)})")


@dataclass
class Preprocessor:
    """The model folder's own tokenizer and image processor."""

    tokenizer: Any
    image_processor: Any
    max_length: int = 35
    pad_to_max_length: bool = False

    @classmethod
    def from_pretrained(cls, source: str | Path, **kw: Any) -> "Preprocessor":
        import transformers

        errors = (OSError, ValueError, KeyError, TypeError)
        try:
            img = transformers.AutoImageProcessor.from_pretrained(str(source))
        except errors as exc:
            raise DataError(f"{source} has no usable image processor: {str(exc).splitlines()[0]}") from None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(source))
        except errors:
            tok = None  # vision-only models (ViT, DeiT) have none; text tasks say so when they need it
        return cls(tok, img, **kw)

    def save_pretrained(self, out_dir: str | Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
        self.image_processor.save_pretrained(str(out_dir))

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def text(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise DataError("the model folder has no tokenizer, which this task needs")
        enc = self.tokenizer(
            list(texts),
            padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class ImageStore:
    """Pixel tensors by path; small sets are kept in memory after the first read."""

    def __init__(self, prep: Preprocessor, cache_limit: int = 20000):
        self.prep = prep
        self.cache: dict[Path, torch.Tensor] = {}
        self.cache_limit = cache_limit

    def get(self, paths: Sequence[Path]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(paths) if p not in self.cache]
        if missing:
            px = self.prep.pixels([open_image(p) for p in missing])
            fresh = dict(zip(missing, px))
            if len(self.cache) + len(fresh) <= self.cache_limit:
                self.cache.update(fresh)
            else:
                return torch.stack([self.cache.get(p, fresh.get(p)) for p in paths])  # type: ignore[misc]
        return torch.stack([self.cache[p] for p in paths])


class Batches:
    """A re-iterable list of training batches; each pass reshuffles with its own seed.

    Under torchrun each rank holds a ``shard``: the pass's order is padded to a multiple of the
    world size (as torch's DistributedSampler does) and rank r takes every world-th item from r,
    so the ranks' batches at one step together are exactly the batch one process would draw with
    ``world × batch_size`` items. ``position`` after each batch (epoch, index, the pass's RNG)
    lets a resumed run continue without re-reading the batches it already trained on.
    """

    def __init__(self, n_items: int, batch_size: int, make, seed: int = 0, drop_last: bool = False):
        self.n, self.bs, self.make, self.seed, self.drop_last = n_items, batch_size, make, seed, drop_last
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.position: dict[str, Any] = {"epoch": 0, "index": 0, "rng": None}

    def shard(self, rank: int, world: int) -> "Batches":
        out = Batches(self.n, self.bs, self.make, self.seed, self.drop_last)
        out.rank, out.world = rank, world
        return out

    @property
    def global_batch_size(self) -> int:
        return self.bs * self.world

    def __len__(self) -> int:
        g = self.bs * self.world
        return self.n // g if self.drop_last else -(-self.n // g)

    def _batches(self, rng: random.Random) -> list[list[int]]:
        order = list(range(self.n))
        rng.shuffle(order)
        if self.world > 1:
            used = len(self) * self.bs * self.world if self.drop_last else -(-self.n // self.world) * self.world
            order = (order * (1 + used // max(1, self.n)))[:used]
            order = order[self.rank :: self.world]
        return [order[s : s + self.bs] for s in range(0, len(self) * self.bs, self.bs) if order[s : s + self.bs]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        self.epoch += 1
        for idx in self._batches(rng):
            yield self.make(idx, rng)

    def endless(self, position: dict[str, Any] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Pass after pass from ``position`` (a ``self.position`` of an earlier run) or the start."""
        epoch, index, state = (int(position["epoch"]), int(position["index"]), position["rng"]) if position \
            else (self.epoch, 0, None)
        while True:
            rng = random.Random(self.seed * 100003 + epoch)
            batches = self._batches(rng)
            if not batches:
                raise ValueError("no batches to train on")
            if state is not None:
                rng.setstate(_as_rng_state(state))
                state = None
            for k in range(index, len(batches)):
                batch = self.make(batches[k], rng)
                self.position = {"epoch": epoch, "index": k + 1, "rng": rng.getstate()}
                yield batch
            epoch, index = epoch + 1, 0


def _as_rng_state(state: Any) -> tuple:
    """random.Random state back from a checkpoint (lists where tuples were)."""
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Task:
    """Loss and evaluation of one task on one family, over a data folder."""

    name: ClassVar[str]
    primary: ClassVar[str]
    trainable: ClassVar[bool] = True
    #: which ANNOTATION_NAMES entry the split files follow, and the reader for them (JSON-based tasks)
    annotation: ClassVar[str]
    reader: ClassVar[Callable[..., list[Any]]]

    def __init__(self, adapter: Any, prep: Preprocessor, data_dir: str | Path, batch_size: int = 32,
                 eval_batch_size: int = 64, seed: int = 0, model: nn.Module | None = None, **options: Any):
        self.adapter, self.prep = adapter, prep
        self.model = model  # label names and similar facts are read from it
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.options = options
        self.images = ImageStore(prep)

    def _records(self, split: str, limit: int | None = None) -> list[Any]:
        """The split's records (the first ``limit`` of them), read from the data folder."""
        recs = type(self).reader(find_annotation(self.data_dir, self.annotation, split), self.options.get("image_root"))
        return recs[:limit] if limit else recs

    def predict_all(self, model: nn.Module, records: list[Any], run: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """``run(chunk)`` over ``records`` in evaluation batches, the model in eval mode; one output per record,
        in order. Under torchrun each rank runs its share and the outputs are gathered."""
        from ..distributed import current

        dist = current()
        mine = dist.share(records)
        was = model.training
        model.eval()
        out: list[Any] = []
        with torch.no_grad():
            for s in range(0, len(mine), self.eval_batch_size):
                out += run(mine[s : s + self.eval_batch_size])
        model.train(was)
        return dist.concat(out)

    def train_batches(self) -> Batches:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        raise NotImplementedError

    def metric_fn(self, split: str = "val", limit: int | None = None):
        """``eval_fn`` for ``upop.compress``: the primary metric on ``split``."""
        return lambda model: self.evaluate(model, split, limit)[self.primary]
