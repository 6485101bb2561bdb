"""What a task is: batches for training, a loss, and an evaluation with a primary metric.

A task is chosen per family by the adapter (``adapter.tasks``), or names the families it serves when it registers
(``register_task``): the same task name can map to different implementations (BLIP retrieval uses ITC + ITM; CLIP
a contrastive loss). A task describes itself: its annotation file names and reader, its options (``upop compress``
flags, from the declaration), and the model classes it trains.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..datasets.loading import (
    SMALL_SET,
    Images,
    SeededPixels,
    PixelCache,
    PixelDataset,
    PixelPipeline,
    _Feed,
    cache_bytes,
    default_workers,
    fill,
    make_loader,
    with_seeds,
)
from ..training.augment import Augmenter, augmenter_for
from ..datasets.readers import DataError, check_images
from ..adapters.base import TaskHooks
from ..errors import ConfigError
from ..run.options import Option, at_least

_TASKS: dict[str, type["Task"]] = {}
#: (family, task name) -> implementation key, for tasks that name the families they serve (``register_task``)
_SERVES: dict[tuple[str, str], str] = {}


def register_task(key: str, families: Sequence[str] = ()):
    """Registers a task implementation under ``key``; its options join ``upop compress``'s table.

    ``families``: the model families it serves beyond their adapters' own ``tasks`` maps (a task added in a
    file of its own names them here, so no adapter is edited)."""
    def deco(cls: type["Task"]) -> type["Task"]:
        from ..run.options import add_task_options

        _TASKS[key] = cls
        for family in families:
            _SERVES[(family, cls.name)] = key
        add_task_options(cls.task_options)
        return cls

    return deco


def task_class(key: str) -> type["Task"]:
    return _TASKS[key]


def task_names() -> tuple[str, ...]:
    """Every registered task name, sorted."""
    return tuple(sorted({cls.name for cls in _TASKS.values()}))


def implementation(adapter: TaskHooks, task: str) -> str | None:
    """The implementation key of ``task`` for the adapter's family: its own map's, else a registered task's that
    names the family; None when the family cannot do it."""
    return adapter.tasks.get(task) or _SERVES.get((adapter.family, task))


def family_tasks(adapter: TaskHooks) -> list[str]:
    """The task names the adapter's family can do."""
    return sorted(set(adapter.tasks) | {t for f, t in _SERVES if f == adapter.family})


def declaring() -> dict[str, list[str]]:
    """Each task option's name → the titles of the tasks that declare it."""
    out: dict[str, list[str]] = {}
    for cls in _TASKS.values():
        for opt in cls.task_options:
            users = out.setdefault(opt.name, [])
            if (cls.title or cls.name) not in users:
                users.append(cls.title or cls.name)
    return out


def find_annotation(data_dir: Path, task: type["Task"], split: str) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    names = [n.format(split=split) for n in task.annotation]
    if split == "val":  # NLVR2 and others call it dev
        names += [n.format(split="dev") for n in task.annotation]
    for n in names:
        if (data_dir / n).is_file():
            return data_dir / n
    raise DataError(f"{data_dir} has no {split} split for {task.name} (looked for {', '.join(names)})")


@dataclass
class Preprocessor:
    """The model folder's own tokenizer and image processor."""

    tokenizer: Any
    image_processor: Any
    max_length: int = 35
    pad_to_max_length: bool = False
    #: the folder's multimodal processor (chat template, image-token expansion): loaded from ``source`` on first use
    processor: Any = None
    source: str | None = None

    @classmethod
    def from_pretrained(cls, source: str | Path, **kw: Any) -> "Preprocessor":
        import transformers

        errors = (OSError, ValueError, KeyError, TypeError)
        try:
            img = transformers.AutoImageProcessor.from_pretrained(str(source), trust_remote_code=False)
        except errors as exc:
            raise DataError(f"{source} has no usable image processor: {str(exc).splitlines()[0]}") from None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
        except errors:
            tok = None  # vision-only models (ViT, DeiT) have none; text tasks say so when they need it
        return cls(tok, img, source=str(source), **kw)

    def multimodal(self) -> Any:
        """The model folder's processor (the chat tasks' template and image tokens), loaded once."""
        if self.processor is None:
            import transformers

            if self.source is None:
                raise DataError("this task needs the model folder's processor (its chat template), and none was given")

            try:
                self.processor = transformers.AutoProcessor.from_pretrained(str(self.source), trust_remote_code=False)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{self.source} has no usable processor: {str(exc).splitlines()[0]}") from None
            self.processor.tokenizer, self.processor.image_processor = self.tokenizer, self.image_processor
        return self.processor

    def save_pretrained(self, out_dir: str | Path) -> None:
        if self.processor is not None:  # its own files (chat template, image tokens) with the tokenizer's and images'
            self.processor.save_pretrained(str(out_dir))
            return
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
    """A task's images: uint8 pixels decoded by DataLoader workers (``workers``; None: ``default_workers``),
    cached up to ``cache_gb`` GiB (None: up to AUTO_CACHE_GB for sets of at most SMALL_SET images, else
    off), normalised on the device. With ``augment`` (an ``Augmenter``), training pixels (those that carry
    seeds) are augmented on the device before the normalisation; evaluation pixels never are."""

    def __init__(self, prep: Preprocessor, workers: int | None = None, cache_gb: float | None = None,
                 augment: Augmenter | None = None):
        if workers is not None and workers < 0:
            raise DataError(f"workers must be 0 (decode in this process) or more, not {workers}")
        self.prep, self.workers, self.cache_gb, self.augment = prep, workers, cache_gb, augment
        self._pipeline: PixelPipeline | None = None
        self._dataset: PixelDataset | None = None
        self._eval: dict[int, tuple[Any, Any]] = {}  # worker count → (persistent loader, its feed)

    @property
    def pipeline(self) -> PixelPipeline:
        if self._pipeline is None:  # built on first use: a task that never reads an image never probes the processor
            self._pipeline = PixelPipeline(self.prep.image_processor)
        return self._pipeline

    @property
    def dataset(self) -> PixelDataset:
        if self._dataset is None:
            crop = self.augment.policy if self.augment is not None else None
            self._dataset = PixelDataset(self.pipeline, PixelCache(cache_bytes(self.cache_gb)), crop)
        return self._dataset

    def workers_for(self, n_images: int) -> int:
        return self.workers if self.workers is not None else default_workers(n_images)

    def remember(self, n_images: int) -> bool:
        return self.cache_gb is not None or n_images <= SMALL_SET

    def get(self, paths: Sequence[Path], device: torch.device | None = None) -> torch.Tensor:
        """The processor's pixels for ``paths``, decoded here (no workers)."""
        px = self.pipeline.stack([self.dataset.one(p, self.remember(len(paths))) for p in paths])
        return self.pipeline.normalize(px, device)

    def normalize(self, px: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        if not isinstance(px, SeededPixels):
            return self.pipeline.normalize(px, device)
        px = px.to(device) if device is not None else px
        plain = px.plain()
        if self.augment is None or plain.dtype != torch.uint8:  # a processor run whole: its float pixels as they are
            return self.pipeline.normalize(plain)
        flat = plain.reshape(-1, *plain.shape[-3:])
        draws = self.augment.draws(px.seeds, *flat.shape[-2:])
        out = self.augment.erase(self.pipeline.normalize(self.augment.pixels(flat, draws, px.cropped)), draws)
        return out.view(*plain.shape)

    def stream(self, groups: Sequence[Sequence[Path]], device: torch.device) -> Iterator[torch.Tensor]:
        """Each group's pixels on ``device``, in order, decoded ahead by a persistent pool of workers."""
        n = sum(len(g) for g in groups)
        items = (({"px": Images(tuple(g))}, None) for g in groups)
        for plan, _ in fill(self._eval_loader(self.workers_for(n)), items, self.remember(n)):
            yield self.normalize(plan["px"], device)

    def _eval_loader(self, workers: int):
        if workers not in self._eval:
            feed = _Feed()
            self._eval[workers] = (make_loader(self.dataset, feed, workers), feed)
        loader, feed = self._eval[workers]

        def loader_for(requests):
            feed.items = requests
            return loader

        return loader_for

    def fill(self, items: Iterable[tuple[Any, Any]], n_images: int) -> Iterator[tuple[Any, Any]]:
        """Training plans with their pixels, from a loader of their own (it lives as long as the stream)."""
        workers = self.workers_for(n_images)
        return fill(lambda requests: make_loader(self.dataset, requests, workers), items, self.remember(n_images),
                    self.dataset.crops)


class Batches:
    """A re-iterable list of training batches; each pass reshuffles with its own seed.

    Under torchrun each rank holds a ``shard``: the pass's order is padded to a multiple of the
    world size (as torch's DistributedSampler does) and rank r takes every world-th item from r,
    so the ranks' batches at one step together are exactly the batch one process would draw with
    ``world × batch_size`` items. ``position`` after each batch (epoch, index, the pass's RNG)
    lets a resumed run continue without re-reading the batches it already trained on.

    ``make(idx, rng)`` plans a batch in this process, in order (it draws from the pass's RNG); with
    ``images`` (an ``ImageStore``), the ``Images`` in a plan are decoded by DataLoader workers ahead
    of use, and the batch holds them as uint8 (the task's loss normalises them on the device).
    """

    def __init__(self, n_items: int, batch_size: int, make, seed: int = 0, drop_last: bool = False,
                 images: ImageStore | None = None):
        # The batch trained (and reported) is the whole split, not the number asked for: said when training starts.
        self.asked = batch_size
        batch_size = min(batch_size, n_items) if n_items > 0 else batch_size
        self.n, self.bs, self.make, self.seed, self.drop_last = n_items, batch_size, make, seed, drop_last
        self.images = images
        self.epoch = 0
        self.rank, self.world = 0, 1
        self.position: dict[str, Any] = {"epoch": 0, "index": 0, "rng": None}

    def shard(self, rank: int, world: int) -> "Batches":
        out = Batches(self.n, min(self.bs, max(1, -(-self.n // world))), self.make, self.seed, self.drop_last, self.images)
        out.asked = self.asked
        out.rank, out.world = rank, world
        return out

    @property
    def global_batch_size(self) -> int:
        return self.bs * self.world

    def __len__(self) -> int:
        g = self.bs * self.world
        return self.n // g if self.drop_last else -(-self.n // g)

    def _batches(self, rng: random.Random) -> list[list[int]]:
        if self.asked > self.n > 0:
            from ..run.safety import say_once

            say_once(f"batch size {self.asked:,} is more than the {self.n:,} training items: each batch holds all "
                     f"{self.n:,} (the effective batch reported)")
        order = list(range(self.n))
        rng.shuffle(order)
        if self.world > 1:
            used = len(self) * self.bs * self.world if self.drop_last else -(-self.n // self.world) * self.world
            order = (order * (1 + used // max(1, self.n)))[:used]
            order = order[self.rank :: self.world]
        return [order[s : s + self.bs] for s in range(0, len(self) * self.bs, self.bs) if order[s : s + self.bs]]

    def _plan(self, idx: list[int], rng: random.Random, epoch: int) -> Any:
        """``make``'s plan; its images stamped with per-item augmentation seeds when they are augmented
        (no draw from ``rng``: the batches and texts stay those of a run without augmentation)."""
        plan = self.make(idx, rng)
        if self.images is not None and self.images.augment is not None:
            plan = with_seeds(plan, idx, self.seed, epoch)
        return plan

    def _loaded(self, plans: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        return iter(plans) if self.images is None else self.images.fill(plans, self.n)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        epoch, self.epoch = self.epoch, self.epoch + 1
        for batch, _ in self._loaded((self._plan(idx, rng, epoch), None) for idx in self._batches(rng)):
            yield batch

    def endless(self, position: dict[str, Any] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Pass after pass from ``position`` (a ``self.position`` of an earlier run) or the start."""
        for batch, pos in self._loaded(self._planned(position)):
            self.position = pos
            yield batch

    def _planned(self, position: dict[str, Any] | None) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(plan, the position after it), pass after pass; the loader may run ahead of the consumer."""
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
                plan = self._plan(batches[k], rng, epoch)
                yield plan, {"epoch": epoch, "index": k + 1, "rng": rng.getstate()}
            epoch, index = epoch + 1, 0


def _as_rng_state(state: Any) -> tuple:
    """random.Random state back from a checkpoint (lists where tuples were)."""
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    # non_blocking: a pinned batch (DataLoader pin_memory on CUDA machines) copies while the host goes on
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) of softmax(logits / T) over the last dimension, times T² (the gradient scale stays
    that of the task loss as T changes), averaged over the rows (those where ``keep`` is true); 0 when equal.
    The teacher's logits carry no gradient."""
    t = float(temperature)
    s_log = F.log_softmax(student.float() / t, dim=-1)
    t_log = F.log_softmax(teacher.detach().float() / t, dim=-1)
    rows = (t_log.exp() * (t_log - s_log)).sum(-1)
    if keep is not None:
        rows = rows[keep]
    if rows.numel() == 0:
        return s_log.sum() * 0.0
    return rows.mean() * t * t


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Forwards:
    """The forward passes a task's evaluation runs, declared in one place. These are PyTorch's; an exported
    artifact's runtime (``upop.exporters.evaluate``) gives a task its own, so the artifact is evaluated by the
    same loops, splits and metrics as the model. Tensors in and out; ``model`` is what ``evaluate`` was given."""

    def __init__(self, adapter: TaskHooks):
        self.adapter = adapter

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.adapter.encode_image(model, pixel_values)

    def encode_text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.adapter.encode_text(model, input_ids, attention_mask)

    def itm_logits(self, model: nn.Module, image_seq: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        return self.adapter.itm_logits(model, image_seq, input_ids, attention_mask)

    def logits(self, model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
        return model(**inputs).logits

    def generate(self, model: nn.Module, decoding: "Decoding", **inputs: torch.Tensor) -> torch.Tensor:
        """The token ids, [batch, length] (a prompt's tokens included), decoded as ``decoding`` says."""
        return model.generate(**inputs, **decoding.generate_kwargs())


#: greedy decoding's new tokens at evaluation, for the tasks that decode greedily (each has its own default)
MAX_NEW_TOKENS = Option("max_new_tokens", at_least(1), int,
                        "VQA/caption decoded greedily: new tokens at evaluation (default: chat VQA 8, chat captions 24, "
                        "BLIP VQA 5).", scores=True)


@dataclass(frozen=True)
class Decoding:
    """How a generative task decodes, in ``generate()``'s terms, so that PyTorch and an exported artifact
    decode alike: greedy with ``max_new_tokens`` (``num_beams`` 1), or beam search to ``max_length`` tokens in
    all (the prompt and the start token counted, as ``generate`` counts them), at least ``min_length``.
    ``prompt``: text the decoder starts from (after its start token); it is stripped from the result."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_length: int = 0
    num_beams: int = 1
    prompt: str = ""
    length_penalty: float = 1.0
    early_stopping: bool = False

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"num_beams": self.num_beams, "do_sample": False}
        if self.max_length is not None:
            kw["max_length"] = self.max_length
        else:
            kw["max_new_tokens"] = self.max_new_tokens
        if self.min_length:
            kw["min_length"] = self.min_length
        if self.num_beams > 1:
            kw.update(length_penalty=self.length_penalty, early_stopping=self.early_stopping)
        return kw


class Task:
    """Loss and evaluation of one task on one family, over a data folder."""

    name: ClassVar[str]
    primary: ClassVar[str]
    trainable: ClassVar[bool] = True
    #: the split's annotation file names searched for in a data folder ({split}: train/val/test; val also as
    #: dev), and the reader for them (JSON-based tasks)
    annotation: ClassVar[tuple[str, ...]] = ()
    reader: ClassVar[Callable[..., list[Any]]]
    #: the task's own options (``upop compress`` flags and TOML keys, checked by their rules), read from ``options``
    task_options: ClassVar[tuple[Option, ...]] = ()
    #: who uses ``task_options``, in the line that refuses one on another run ("BLIP retrieval")
    title: ClassVar[str] = ""
    #: images per record (``upop predict`` asks for this many)
    images_per_record: ClassVar[int] = 1
    #: the model classes it trains beyond those whose adapter names this task (a task added in a file of its own)
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: the export graphs its evaluation runs through ``Forwards`` (``upop eval EXPORT_DIR`` checks the export has them)
    artifact_graphs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, adapter: TaskHooks, prep: Preprocessor, data_dir: str | Path, batch_size: int = 32,
                 eval_batch_size: int = 64, seed: int = 0, model: nn.Module | None = None, workers: int | None = None,
                 cache_gb: float | None = None, **options: Any):
        self.adapter, self.prep = adapter, prep
        self.model = model  # label names and similar facts are read from it
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.options = options
        for opt in self.task_options:  # the rules of upop compress's flags, for callers of the library too
            opt.rule.check(opt.name, options.get(opt.name))
        self.images = ImageStore(prep, workers, cache_gb, augmenter_for(adapter, options.get("augment")))
        self.forwards = Forwards(adapter)  # what evaluate() runs; replaced to evaluate an exported artifact
        self.amp = True  # evaluation under CUDA autocast, as the run trains (``SearchConfig.amp``); CPU: never

    def _records(self, split: str, limit: int | None = None) -> list[Any]:
        """The split's records (the first ``limit`` of them), read from the data folder."""
        recs = type(self).reader(find_annotation(self.data_dir, type(self), split), self.options.get("image_root"))
        return recs[:limit] if limit else recs

    def image_paths(self, split: str) -> list[Path]:
        """Every image the split's records name (both of a pair), for the check before a run."""
        out: list[Path] = []
        for r in self._records(split):
            out.extend(r.images if hasattr(r, "images") else [r.image])
        return out

    def check_images(self, splits: Sequence[str] = ("train", "val", "test")) -> int:
        """Opens the header of every image of the splits the data has, so a corrupt or truncated file stops
        the run before the search (naming the file) rather than an hour into it. Returns the images checked."""
        paths: list[Path] = []
        for split in splits:
            try:
                paths += self.image_paths(split)
            except DataError:  # a split the data does not have: the run says so where it needs it
                continue
        return check_images(paths)

    def on_device(self, batch: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        """A training batch on the model's device, its uint8 pixels normalised there."""
        out = to_device(batch, device_of(model))
        if isinstance(out.get("pixel_values"), torch.Tensor):
            out["pixel_values"] = self.images.normalize(out["pixel_values"])
        return out

    def predict_all(self, model: nn.Module, records: list[Any], run: Callable[[list[Any], torch.Tensor], list[Any]],
                    images: Callable[[Any], Sequence[Path]]) -> list[Any]:
        """``run(chunk, pixels)`` over ``records`` in evaluation batches, the model in eval mode; one output per
        record, in order. ``pixels`` are the chunk's ``images(record)`` in order, normalised on the model's device.
        Under torchrun each rank runs its share and the outputs are gathered."""
        from ..training.distributed import current

        dist = current()
        mine = dist.share(records)
        chunks = [mine[s : s + self.eval_batch_size] for s in range(0, len(mine), self.eval_batch_size)]
        groups = [[p for r in chunk for p in images(r)] for chunk in chunks]
        was = model.training
        model.eval()
        out: list[Any] = []
        with torch.no_grad():
            for chunk, px in zip(chunks, self.images.stream(groups, device_of(model))):
                out += run(chunk, px)
        model.train(was)
        return dist.concat(out)

    def train_batches(self) -> Batches:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, Any],
                guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one training batch that the loss is computed from (logits, similarity rows, ...).

        ``guide``: the student's outputs on the same batch, given when a teacher runs: the teacher reuses the
        student's random choices (stored as index tensors in the outputs), runs no momentum model, updates no
        queue and draws no random numbers, so both models are compared on exactly the same inputs."""
        raise ConfigError(f"the {self.name} task ({type(self).__name__}) has no distillation outputs "
                                    "(Task.forward); run it without --distill")

    def loss_from(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """The task's training loss from ``forward``'s outputs."""
        raise ConfigError(f"the {self.name} task ({type(self).__name__}) has no loss_from")

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_from(self.forward(model, batch), batch)

    def distill_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float) -> torch.Tensor:
        """Logit distillation for this task (a scalar): KL(teacher || student) of the task's natural
        distributions at ``temperature`` (scaled by T²); exactly 0 when the two outputs are equal."""
        raise ConfigError(f"the {self.name} task ({type(self).__name__}) has no logit distillation "
                                    "(Task.distill_terms); use --distill features or run without --distill")

    @classmethod
    def distills(cls) -> bool:
        """Whether the task implements the distillation interface (``forward`` of its own)."""
        return cls.forward is not Task.forward

    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        raise NotImplementedError

    def metric_fn(self, split: str = "val", limit: int | None = None):
        """``eval_fn`` for ``upop.compress``: the primary metric on ``split``."""
        return lambda model: self.evaluate(model, split, limit)[self.primary]
