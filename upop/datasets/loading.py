"""The input pipeline: DataLoader workers decode and resize images to uint8; the device normalises them.

Why this split: decoding and resizing are the CPU cost of an image and belong in worker processes,
ahead of the step that needs them; rescaling and normalising are one table look-up per pixel, cheap
on the device and four times the bytes if done on the host (float32 against uint8). The geometry is
the model processor's own (PIL resize, centre crop) and the look-up table is computed with the
processor's own float operations, so the pixels equal ``image_processor(images)`` exactly.

Memory stays bounded: the only cache holds uint8 pixels and stops growing at a cap in bytes.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..training.augment import item_seed
from .readers import DataError, open_image

#: Sets up to this many images are decoded in-process and cached by default: starting worker
#: processes costs more than decoding them, and caching them costs little.
SMALL_SET = 2000
#: The default cache cap for small sets; ``cache_gb`` sets it for any set.
AUTO_CACHE_GB = 1.0
#: Batches each worker decodes ahead of the one in use.
PREFETCH = 4


def default_workers(n_images: int | None = None) -> int:
    """Worker processes per rank: a share of this node's cores (one is left to the training loop),
    at most 8; none for a small set."""
    if n_images is not None and n_images <= SMALL_SET:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_rank - 1))


@dataclass(frozen=True)
class Images:
    """Image paths standing for their pixels in a planned batch (``per`` images per item: NLVR's pairs).
    ``seeds``: one augmentation seed per path, for a training batch that is augmented (upop.training.augment)."""

    paths: tuple[Path, ...]
    per: int = 1
    seeds: tuple[int, ...] | None = None


class SeededPixels(torch.Tensor):
    """uint8 training pixels that carry each image's augmentation seed to the device, where the task's
    normalisation augments them (a plain tensor otherwise: torch functions return plain tensors).
    ``cropped``: the workers took each image's random crop from its decoded original."""

    seeds: tuple[int, ...]
    cropped: bool
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def of(px: torch.Tensor, seeds: tuple[int, ...], cropped: bool = False) -> "SeededPixels":
        out = px.as_subclass(SeededPixels)
        out.seeds, out.cropped = seeds, cropped
        return out

    def to(self, *args: Any, **kwargs: Any) -> "SeededPixels":  # type: ignore[override]
        return SeededPixels.of(torch.Tensor.to(self, *args, **kwargs), self.seeds, self.cropped)

    def plain(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)


def with_seeds(plan: Any, items: list[int], seed: int, epoch: int) -> Any:
    """``plan`` with each ``Images`` stamped with per-image seeds from (seed, epoch, item index, image of the
    item). A plan whose images do not line up with its items (``per`` images each) is left as it is."""
    if not isinstance(plan, dict):
        return plan
    out = dict(plan)
    for key, ref in plan.items():
        if isinstance(ref, Images) and len(ref.paths) == len(items) * ref.per:
            seeds = tuple(item_seed(seed, epoch, i, j) for i in items for j in range(ref.per))
            out[key] = Images(ref.paths, ref.per, seeds)
    return out


class CaptionPairs:
    """Every (record, caption) pair of a split as one flat index, the reference's epoch for retrieval and
    captioning: pair k is caption k − start[r] of record r. Only the records' running caption counts are
    held (one integer per record), so a 566k-pair COCO epoch costs no list of pairs."""

    def __init__(self, counts: Iterable[int]):
        self.starts = np.concatenate([[0], np.cumsum(np.fromiter(counts, dtype=np.int64))])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, k: int) -> tuple[int, int]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        r = int(np.searchsorted(self.starts, k, side="right")) - 1
        return r, int(k - self.starts[r])


# ---- the model processor's transform, split at uint8 -------------------------------------------
@dataclass(frozen=True)
class _PilGeometry:
    """A PIL-backend processor's resize and centre crop, on the RGB image, without its float steps."""

    size: tuple[int, int] | None  # (height, width), or None: shortest edge to ``shortest``
    shortest: int | None
    crop: tuple[int, int] | None
    resample: int

    def __call__(self, im: Any) -> torch.Tensor | None:
        """[H, W, 3] uint8, as PIL lays it out (channels first would cost a strided copy per image here)."""
        h, w = self.size or _shortest_edge(im.height, im.width, int(self.shortest))  # type: ignore[arg-type]
        arr = np.array(im.resize((w, h), resample=self.resample))
        if self.crop is not None:
            top, left = (h - self.crop[0]) // 2, (w - self.crop[1]) // 2
            if top < 0 or left < 0:
                return None  # the processor pads a crop larger than the image: left to it
            arr = arr[top : top + self.crop[0], left : left + self.crop[1]]
        return torch.from_numpy(arr)


def _shortest_edge(h: int, w: int, size: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False), as (height, width)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def _pil_geometry(proc: Any) -> _PilGeometry | None:
    """The geometry of a stock PIL-backend processor; None for any other (its own call is used)."""
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:
        return None
    methods = ("_preprocess", "process_image", "resize", "center_crop")
    if not isinstance(proc, PilBackend) or any(getattr(type(proc), m) is not getattr(PilBackend, m) for m in methods):
        return None
    size, crop = proc.size, proc.crop_size if proc.do_center_crop else None
    if getattr(proc, "do_pad", None) or not proc.do_resize:
        return None
    if crop is not None and not (crop.height and crop.width):
        return None
    fixed = (int(size.height), int(size.width)) if size.height and size.width else None
    if fixed is None and not (size.shortest_edge and not size.longest_edge):
        return None
    return _PilGeometry(fixed, size.shortest_edge, (int(crop.height), int(crop.width)) if crop is not None else None,
                        int(proc.resample if proc.resample is not None else 2))


def _lut(proc: Any) -> torch.Tensor:
    """[3, 256]: each channel's uint8 value after the processor's rescale and normalise, computed with the
    same float64 → float32 rescale and float32 normalise that transformers' numpy functions use."""
    scale = float(proc.rescale_factor) if proc.do_rescale else 1.0
    values = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    table = np.stack([values] * 3)
    if proc.do_normalize:
        mean, std = (np.array(_three(v), dtype=np.float32)[:, None] for v in (proc.image_mean, proc.image_std))
        table = (table - mean) / std
    return torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))


def _three(v: Any) -> list[float]:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * 3


class PixelPipeline:
    """``load``: one image file → uint8 [3, H, W] (in a worker); ``normalize``: a uint8 batch → the
    processor's float32 pixels (on the device). A processor whose steps are not known is run whole in
    the worker (float32 out) and ``normalize`` passes its output through."""

    def __init__(self, processor: Any):
        from PIL import Image

        self.processor = processor
        probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (29, 37, 3), dtype=np.uint8))
        self.table = _lut(processor) if self._splits_at_uint8(probe) else None
        self.geometry = _pil_geometry(processor) if self.table is not None else None
        seen = self.geometry(probe) if self.geometry is not None else None
        if seen is None or not torch.equal(seen, self._by_processor(probe).permute(1, 2, 0)):
            self.geometry = None  # a processor that resizes differently from what we read: its own call
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _splits_at_uint8(self, probe: Any) -> bool:
        try:
            out = self._by_processor(probe)
            _lut(self.processor)
        except (AttributeError, TypeError, ValueError):
            return False
        # [images per item, 3, H, W] (Idefics3's) is the processor's own layout: run whole, its output kept as it is
        return out.dtype == torch.uint8 and out.ndim == 3

    def _by_processor(self, im: Any) -> torch.Tensor:
        return self.processor(images=[im], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]

    @property
    def out_size(self) -> tuple[int, int] | None:
        """(height, width) of every image out of the processor, when it is fixed and its geometry is known."""
        g = self.geometry
        if g is None:
            return None
        return g.crop or g.size

    def load_crop(self, path: Path, box: Callable[[int, int], tuple[int, int, int, int]]) -> torch.Tensor:
        """uint8 [H, W, 3] at ``out_size``: the crop ``box(height, width)`` of the decoded original, resized
        with PIL's bicubic filter (antialiased when it shrinks), as a random resized crop of the original."""
        from PIL import Image

        im = open_image(path)
        top, left, h, w = box(im.height, im.width)
        oh, ow = self.out_size  # type: ignore[misc]
        return torch.from_numpy(np.array(im.crop((left, top, left + w, top + h)).resize((ow, oh), resample=Image.BICUBIC)))

    def load(self, path: Path) -> torch.Tensor:
        """uint8 [H, W, 3]; or, for a processor run whole, float32 [3, H, W]."""
        im = open_image(path)
        if self.table is None:
            return self.processor(images=[im], return_tensors="pt")["pixel_values"][0]
        px = self.geometry(im) if self.geometry is not None else None
        return px if px is not None else self._by_processor(im).permute(1, 2, 0)

    @staticmethod
    def stack(images: list[torch.Tensor]) -> torch.Tensor:
        """[n, 3, H, W]: uint8 images are copied as they lie ([H, W, 3], a plain copy) and viewed channels
        first; the device makes the normalised pixels contiguous. numpy copies on this thread, where
        torch.stack would wake the intra-op thread pool for a memcpy (costly on a busy host)."""
        out = torch.from_numpy(np.stack([px.numpy() for px in images]))
        return out.permute(0, 3, 1, 2) if out.dtype == torch.uint8 else out

    def normalize(self, px: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """[..., 3, H, W] uint8 → float32 on ``device`` (default: where ``px`` is); float input passes through."""
        px = px.to(device, non_blocking=True) if device is not None else px
        if px.dtype != torch.uint8 or self.table is None:
            return px
        table = self._tables.get(px.device)
        if table is None:
            table = self._tables[px.device] = self.table.flatten().to(px.device)
        offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=px.device).view(3, 1, 1)
        return table[px.int() + offsets].contiguous()


# ---- a byte-capped uint8 cache -----------------------------------------------------------------
class PixelCache:
    """Pixels by path, at most ``cap`` bytes. Once full it takes nothing more rather than evicting:
    passes visit every image once in a fresh order, so an evicting cache smaller than the set would
    mostly evict what the pass is about to need, and one that keeps its first images hits as often."""

    def __init__(self, cap: int):
        self.cap, self.bytes = int(cap), 0
        self.items: dict[Path, torch.Tensor] = {}

    def get(self, key: Path) -> torch.Tensor | None:
        return self.items.get(key)

    def put(self, key: Path, px: torch.Tensor) -> None:
        size = px.numel() * px.element_size()
        if key not in self.items and self.bytes + size <= self.cap:
            self.items[key] = px.contiguous()  # a crop is a view of the whole resized image: keep only the crop
            self.bytes += size


def cache_bytes(cache_gb: float | None) -> int:
    return int((AUTO_CACHE_GB if cache_gb is None else max(0.0, float(cache_gb))) * 2**30)


@dataclass(frozen=True)
class _Failed:
    """A worker's DataError, returned rather than raised so that the main process raises it as one line."""

    message: str


class PixelDataset(torch.utils.data.Dataset):
    """Index: (paths, remember, seeds) → the paths' uint8 pixels, [n, 3, H, W] (None for no paths). With a
    ``crop`` policy (``Policy.crop_box``) and seeds (training images), each image is its random crop of the
    decoded original, never cached (a crop is new each epoch); otherwise the processor's pixels."""

    def __init__(self, pipeline: PixelPipeline, cache: PixelCache, crop: Any = None):
        self.pipeline, self.cache, self.crop = pipeline, cache, crop

    @property
    def crops(self) -> bool:
        """Whether training images are cropped here (a policy, and a processor with a fixed output size)."""
        return self.crop is not None and self.pipeline.out_size is not None

    def __len__(self) -> int:  # items come from the sampler; there is no fixed set to count
        return 0

    def __getitem__(self, item: tuple[tuple[Path, ...], bool, tuple[int, ...] | None]) -> torch.Tensor | _Failed | None:
        paths, remember, seeds = item
        try:
            if not paths:
                return None
            if seeds is not None and self.crops:
                return self.pipeline.stack([self.pipeline.load_crop(p, partial(self.crop.crop_box, s))
                                            for p, s in zip(paths, seeds)])
            return self.pipeline.stack([self.one(p, remember) for p in paths])
        except DataError as exc:
            return _Failed(str(exc))

    def one(self, path: Path, remember: bool = True) -> torch.Tensor:
        px = self.cache.get(path)
        if px is None:
            px = self.pipeline.load(path)
            if remember:
                self.cache.put(path, px)
        return px


def _worker_cache(_worker_id: int) -> None:
    """Each worker caches into its own share of the cap (what it inherited from the parent stays shared)."""
    info = torch.utils.data.get_worker_info()
    ds = info.dataset
    ds.cache = PixelCache(ds.cache.cap // max(1, info.num_workers))


def _keep(x: Any) -> Any:
    return x


class _Feed:
    """A sampler whose items are set before each iteration (so a persistent loader serves many passes)."""

    def __init__(self) -> None:
        self.items: Iterable[Any] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)


#: What one decoding worker process costs in memory (a forked Python with torch and PIL: measured ~300 MiB).
WORKER_BYTES = 300 << 20


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cap_workers(workers: int) -> int:
    """At most one worker per core of this rank and as many as the free memory holds (said once when
    capped): ``--workers 999`` would fork 999 processes of ~300 MiB each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    memory = _available_memory()
    by_memory = memory // WORKER_BYTES if memory is not None else workers
    capped = max(0, min(workers, per_rank, by_memory))
    if capped < workers:
        from ..run.safety import say_once

        free = f", {memory / 2**30:.1f} GiB free at about {WORKER_BYTES >> 20} MiB each" if memory is not None else ""
        say_once(f"--workers {workers} capped to {capped} ({per_rank} core(s) per process{free})")
    return capped


def make_loader(dataset: PixelDataset, sampler: Iterable[Any], workers: int) -> torch.utils.data.DataLoader:
    kw: dict[str, Any] = {}
    workers = cap_workers(workers) if workers > 0 else 0
    if workers > 0:
        kw = {"prefetch_factor": PREFETCH, "persistent_workers": True, "worker_init_fn": _worker_cache}
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=_keep, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), **kw)


def fill(loader_for, items: Iterable[tuple[Any, Any]], remember: bool, crops: bool = False) -> Iterator[tuple[Any, Any]]:
    """(plan, tag) pairs in order, each plan's ``Images`` replaced by their uint8 pixels.

    ``loader_for(sampler)`` gives the DataLoader: it decodes ahead while the caller works. The plans stay
    in this process (a FIFO, since the loader keeps the sampler's order); only their paths (and, for seeded
    training images, their seeds) go to the workers. ``crops``: the loader's dataset crops seeded images.
    """
    pending: deque[tuple[Any, Any, list[tuple[str, Images]]]] = deque()

    def requests() -> Iterator[tuple[tuple[Path, ...], bool, tuple[int, ...] | None]]:
        for plan, tag in items:
            refs = [(k, v) for k, v in plan.items() if isinstance(v, Images)] if isinstance(plan, dict) else []
            pending.append((plan, tag, refs))
            seeded = bool(refs) and all(r.seeds is not None for _k, r in refs)
            seeds = tuple(s for _k, r in refs for s in r.seeds) if seeded else None  # type: ignore[union-attr]
            yield tuple(p for _k, r in refs for p in r.paths), remember, seeds

    for px in loader_for(requests()):
        if isinstance(px, _Failed):
            raise DataError(px.message)
        plan, tag, refs = pending.popleft()
        seeded = bool(refs) and all(r.seeds is not None for _k, r in refs)
        yield (_with_pixels(plan, refs, px, crops and seeded) if refs else plan), tag


def _with_pixels(plan: dict[str, Any], refs: list[tuple[str, Images]], px: torch.Tensor, cropped: bool) -> dict[str, Any]:
    out, start = dict(plan), 0
    for key, ref in refs:
        part = px[start : start + len(ref.paths)]
        part = part.view(len(ref.paths) // ref.per, ref.per, *part.shape[1:]) if ref.per > 1 else part
        out[key] = SeededPixels.of(part, ref.seeds, cropped) if ref.seeds is not None else part
        start += len(ref.paths)
    return out
