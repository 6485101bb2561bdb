"""Training augmentation, applied on the device to training batches only (docs/recipes.md).

Where: the random resized crop is taken by the DataLoader workers from the decoded original image and
resized (PIL bicubic) straight to the processor's output size, as the reference's dataset transforms do:
cropping the processor's output instead would upsample a crop of an already squashed or centre-cropped
image and never show its borders. The rest (flip, RandAugment) runs on the device on those uint8 pixels,
before the normalising look-up table, so evaluation pixels stay exactly the processor's. Erasing, which
fills with unit-normal noise in normalised space, runs after the table. Where the workers cannot crop
(a processor without a fixed output size, or one run whole), the crop is taken on the device from the
processor's pixels, as before.

Which: the adapter names a policy (``Adapter.augment_policy``); the core never names a family.

Reproducible: each image's augmentation depends only on one seed derived from (run seed, epoch, item
index, image of the item), drawn in the main process by the batch plan. Nothing depends on the batch's
composition, the rank, gradient accumulation or a resume, and every image is transformed on its own
(batched kernels may pick different algorithms for different batch sizes).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..adapters.capabilities import TaskHooks

#: ``--augment`` values: none, or the reference augmentation of the model's family
CHOICES = ("none", "default")


def item_seed(seed: int, epoch: int, index: int, image: int = 0) -> int:
    """One 63-bit seed per (run seed, epoch, item index, image of the item): a hash, not a stream, so
    no item's seed depends on which items were drawn before it."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index), int(image)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ---- the image operations, on one float image [3, H, W] holding values in [0, 255] ---------------
def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    return (degenerate + factor * (x - degenerate)).clamp(0, 255)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x).clamp(0, 255)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize, per channel: a look-up table from the cumulative histogram. All channels at
    once and nothing read back to the host (on a GPU the host would wait once per channel)."""
    ch = x.round().long().clamp(0, 255).flatten(1)
    offsets = 256 * torch.arange(len(ch), device=x.device)[:, None]
    hist = torch.bincount((ch + offsets).flatten(), minlength=256 * len(ch)).view(len(ch), 256)
    bins = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, bins, -1).amax(1, keepdim=True)  # the highest level present
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    lut = ((torch.cumsum(hist, 1) - hist + step // 2) // step.clamp(min=1)).clamp(0, 255)
    lut = torch.where(step == 0, bins, lut)  # a channel of (almost) one level stays as it is
    return lut.gather(1, ch).view_as(x).float()


def _sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's SMOOTH kernel on the interior; the border keeps its pixels."""
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = x.clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(x.unsqueeze(0), kernel / 13, groups=3)[0]
    return _blend(smooth, x, factor)


def _posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    mask = (0xFF << (8 - max(0, min(8, bits)))) & 0xFF
    return (x.round().to(torch.uint8) & mask).float()


def _solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x < threshold, x, 255 - x)


def _solarize_add(x: torch.Tensor, add: float, threshold: float = 128) -> torch.Tensor:
    return torch.where(x < threshold, (x + add).clamp(max=255), x)


def _affine(x: torch.Tensor, matrix: list[list[float]], fill: Sequence[float]) -> torch.Tensor:
    """Warp by a 2×3 source → destination matrix, bilinear, the uncovered area filled with ``fill``."""
    from kornia.geometry.transform import warp_affine

    m = torch.tensor([matrix], dtype=x.dtype, device=x.device)
    fv = torch.tensor(list(fill), dtype=x.dtype, device=x.device)
    return warp_affine(x.unsqueeze(0), m, tuple(x.shape[-2:]), mode="bilinear", padding_mode="fill",
                       align_corners=False, fill_value=fv)[0]


def _rotate(x: torch.Tensor, degrees: float, fill: Sequence[float]) -> torch.Tensor:
    h, w = x.shape[-2:]
    a = math.radians(degrees)
    cx, cy = w / 2, h / 2
    cos, sin = math.cos(a), math.sin(a)
    # counter-clockwise about the centre, as PIL and cv2 rotate
    return _affine(x, [[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]], fill)


@dataclass(frozen=True)
class Op:
    """A RandAugment operation: ``level(magnitude in [0, 10], rng, image width) -> argument``."""

    apply: Callable[[torch.Tensor, float, Sequence[float]], torch.Tensor]
    level: Callable[[float, random.Random, int], float]


def _signed(scale: float) -> Callable[[float, random.Random, int], float]:
    return lambda m, rng, _w: (m / 10) * scale * (-1 if rng.random() < 0.5 else 1)


def _none(_m: float, _rng: random.Random, _w: int) -> float:
    return 0.0


def _relative(scale: float) -> Callable[[float, random.Random, int], float]:
    return lambda m, rng, w: (m / 10) * scale * w * (-1 if rng.random() < 0.5 else 1)


_ENHANCE_BLIP = lambda m, _rng, _w: (m / 10) * 1.8 + 0.1  # noqa: E731  (at magnitude 5: factor 1)
_ENHANCE_INCREASING = lambda m, rng, _w: 1 + _signed(0.9)(m, rng, _w)  # noqa: E731

OPS: dict[str, Op] = {
    "identity": Op(lambda x, _a, _f: x, _none),
    "autocontrast": Op(lambda x, _a, _f: _autocontrast(x), _none),
    "equalize": Op(lambda x, _a, _f: _equalize(x), _none),
    "invert": Op(lambda x, _a, _f: 255 - x, _none),
    "brightness": Op(lambda x, a, _f: (x * a).clamp(0, 255), _ENHANCE_BLIP),
    "sharpness": Op(lambda x, a, _f: _sharpness(x, a), _ENHANCE_BLIP),
    "brightness+": Op(lambda x, a, _f: (x * a).clamp(0, 255), _ENHANCE_INCREASING),
    "sharpness+": Op(lambda x, a, _f: _sharpness(x, a), _ENHANCE_INCREASING),
    "color+": Op(lambda x, a, _f: _blend(_gray(x), x, a), _ENHANCE_INCREASING),
    "contrast+": Op(lambda x, a, _f: _blend(_gray(x).mean(), x, a), _ENHANCE_INCREASING),
    "posterize+": Op(lambda x, a, _f: _posterize(x, int(a)), lambda m, _r, _w: 4 - int((m / 10) * 4)),
    "solarize+": Op(lambda x, a, _f: _solarize(x, a), lambda m, _r, _w: 256 - int((m / 10) * 256)),
    "solarize_add": Op(lambda x, a, _f: _solarize_add(x, a), lambda m, _r, _w: int((m / 10) * 110)),
    "rotate": Op(lambda x, a, f: _rotate(x, a, f), _signed(30)),
    "shear_x": Op(lambda x, a, f: _affine(x, [[1, a, 0], [0, 1, 0]], f), _signed(0.3)),
    "shear_y": Op(lambda x, a, f: _affine(x, [[1, 0, 0], [a, 1, 0]], f), _signed(0.3)),
    # BLIP translates by a fixed number of pixels (10 at magnitude 10), DeiT/timm by a share of the width
    "translate_x": Op(lambda x, a, f: _affine(x, [[1, 0, -a], [0, 1, 0]], f), _signed(10)),
    "translate_y": Op(lambda x, a, f: _affine(x, [[1, 0, 0], [0, 1, -a]], f), _signed(10)),
    "translate_x_rel": Op(lambda x, a, f: _affine(x, [[1, 0, -a], [0, 1, 0]], f), _relative(0.45)),
    "translate_y_rel": Op(lambda x, a, f: _affine(x, [[1, 0, 0], [0, 1, -a]], f), _relative(0.45)),
}


# ---- policies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """RandomResizedCrop to the processor's size, a horizontal flip, RandAugment (``n_ops`` drawn with
    replacement from ``ops``, each applied with probability ``op_prob`` at ``magnitude`` ± ``magnitude_std``),
    and random erasing with probability ``erase_prob`` (after normalisation)."""

    name: str
    crop_scale: tuple[float, float]
    ops: tuple[str, ...]
    n_ops: int = 2
    magnitude: float = 5
    magnitude_std: float = 0.0
    op_prob: float = 0.5
    flip: bool = True
    fill: tuple[float, float, float] = (128.0, 128.0, 128.0)
    erase_prob: float = 0.0

    def crop_box(self, seed: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The image's random resized crop box (top, left, height, width) in an image of this size: a stream of
        its own, so the worker that crops the original and the device that flips and augments agree."""
        return _crop_box(random.Random(f"crop:{seed}"), height, width, self.crop_scale)

    def draw(self, seed: int, height: int, width: int) -> "Draw":
        """Every random choice for one image, from its seed alone (on the host: the same on any device)."""
        rng = random.Random(seed)
        crop = self.crop_box(seed, height, width)
        flip = self.flip and rng.random() < 0.5
        ops = []
        for name in rng.choices(self.ops, k=self.n_ops):
            if rng.random() >= self.op_prob:
                continue
            m = rng.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
            m = min(10.0, max(0.0, m))
            ops.append((name, OPS[name].level(m, rng, width)))
        erase = _erase_box(rng, height, width) if rng.random() < self.erase_prob else None
        return Draw(crop, flip, tuple(ops), erase, rng.getrandbits(63))


@dataclass(frozen=True)
class Draw:
    crop: tuple[int, int, int, int]  # top, left, height, width
    flip: bool
    ops: tuple[tuple[str, float], ...]
    erase: tuple[int, int, int, int] | None
    noise_seed: int


def _crop_box(rng: random.Random, h: int, w: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (aspect ratio 3/4 to 4/3, log-uniform); the whole image after 10 misses."""
    area = h * w
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    return 0, 0, h, w


def _erase_box(rng: random.Random, h: int, w: int) -> tuple[int, int, int, int] | None:
    """Random erasing's box: 2% to a third of the area, aspect ratio 0.3 to 3.3 (log-uniform)."""
    for _ in range(10):
        target = h * w * rng.uniform(0.02, 1 / 3)
        ratio = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        eh, ew = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < ew < w and 0 < eh < h:
            return rng.randint(0, h - eh), rng.randint(0, w - ew), eh, ew
    return None


POLICIES: dict[str, Policy] = {
    # BLIP's training transform (random resized crop 0.5–1, flip, RandAugment of 2 ops at magnitude 5), which the
    # UPop paper trains BLIP and CLIP with
    "blip-randaugment": Policy(
        "blip-randaugment", crop_scale=(0.5, 1.0), magnitude=5,
        ops=("identity", "autocontrast", "brightness", "sharpness", "equalize", "shear_x", "shear_y",
             "translate_x", "translate_y", "rotate")),
    # DeiT's recipe: RandomResizedCrop 0.08-1, flip, rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode)
    "deit-randaugment": Policy(
        "deit-randaugment", crop_scale=(0.08, 1.0), magnitude=9, magnitude_std=0.5, erase_prob=0.25,
        fill=(124.0, 116.0, 104.0),
        ops=("autocontrast", "equalize", "invert", "rotate", "posterize+", "solarize+", "solarize_add", "color+",
             "contrast+", "brightness+", "sharpness+", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel")),
}


class Augmenter:
    """A policy applied to batches of uint8 pixels, one image at a time, each from its own seed."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def draws(self, seeds: Sequence[int], height: int, width: int) -> list[Draw]:
        return [self.policy.draw(s, height, width) for s in seeds]

    def pixels(self, px: torch.Tensor, draws: Sequence[Draw], cropped: bool = False) -> torch.Tensor:
        """[n, 3, H, W] uint8 → the augmented uint8 images, same shape and device. ``cropped``: the workers
        already took each image's crop from its original. In float32 whatever the loss runs in: the loss's
        autocast would round the pixels' arithmetic to half precision."""
        with torch.autocast(px.device.type, enabled=False):
            return torch.stack([self._one(img, d, cropped) for img, d in zip(px, draws)])

    def _one(self, img: torch.Tensor, d: Draw, cropped: bool) -> torch.Tensor:
        h, w = img.shape[-2:]
        x = img.float()
        if not cropped:
            top, left, ch, cw = d.crop
            x = x[:, top : top + ch, left : left + cw].unsqueeze(0)
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 255)
        if d.flip:
            x = x.flip(-1)
        for name, arg in d.ops:
            x = OPS[name].apply(x, arg, self.policy.fill)
        return x.round().clamp(0, 255).to(torch.uint8)

    @staticmethod
    def erase(px: torch.Tensor, draws: Sequence[Draw]) -> torch.Tensor:
        """Normalised [n, 3, H, W]: each drawn box filled with unit-normal noise (from the image's seed)."""
        if not any(d.erase is not None for d in draws):
            return px
        px = px.clone()
        for i, d in enumerate(draws):
            if d.erase is None:
                continue
            top, left, eh, ew = d.erase
            g = torch.Generator().manual_seed(d.noise_seed)
            noise = torch.randn((px.shape[1], eh, ew), generator=g, dtype=torch.float32)
            px[i, :, top : top + eh, left : left + ew] = noise.to(px.device, px.dtype)
        return px


def augmenter_for(adapter: "TaskHooks", choice: str | None) -> Augmenter | None:
    """The adapter's policy under ``default``; nothing under ``none`` (or None) or when it names none."""
    if choice is None or choice == "none":
        return None
    if choice != "default":
        raise ConfigError(f"augment must be one of {', '.join(CHOICES)}, got {choice!r}")
    name = adapter.augment_policy
    return Augmenter(POLICIES[name]) if name else None
