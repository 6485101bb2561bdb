"""A momentum (EMA) copy of the model and a queue of its features: BLIP's ITC distillation (``--momentum``).

The copy follows the model after every optimizer step (m ← μ·m + (1 − μ)·θ) and never trains. During the
search it is dense by default, as the reference's (its momentum encoder is built without masks: the EMA of
the student's weights, computing the unpruned function); with ``masked`` the search's ζ tensors are hooked
into the copy too (``MaskSet.attach``), so its features are those of the pruned student it follows. A
training phase that starts afresh starts the copy from the model as it then is (UPop's reference copies the
slim student into its momentum encoder before the retrain) and a fresh queue; its state (weights, queue,
batch count) is part of the run state, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..pruning.masks import masks_of


def _clone(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` without its forward hooks (the search's masks are attached explicitly)."""
    saved = [(m, m._forward_hooks) for m in model.modules()]
    for m, _ in saved:
        m._forward_hooks = OrderedDict()
    try:
        out = copy.deepcopy(model)
    finally:
        for m, hooks in saved:
            m._forward_hooks = hooks
    out.requires_grad_(False)
    return out


#: what a fresh queue holds: random unit vectors with image id -100 (BLIP's, the default: every row is a column of
#: the ITC softmax from the first step), or nothing (rows join as batches are pushed)
QUEUE_INITS = ("random", "empty")


class FeatureQueue:
    """The last ``size`` image and text features (and their image ids), oldest overwritten first. A ``random``
    queue starts full, as BLIP's: ``normalize(randn(dim, size), dim=0)`` for both, ids −100 (no image's)."""

    def __init__(self, size: int, init: str = "random", seed: int = 0):
        self.size, self.init, self.seed = size, init, seed
        self.img: torch.Tensor | None = None
        self.txt: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self.ptr, self.filled = 0, 0

    def _allocate(self, dim: int, like: torch.Tensor) -> None:
        if self.init == "random":
            g = torch.Generator().manual_seed(self.seed)
            self.img, self.txt = (F.normalize(torch.randn(dim, self.size, generator=g), dim=0).t().to(like)
                                  for _ in range(2))
            self.ids = torch.full((self.size,), -100, dtype=torch.long, device=like.device)
            self.filled = self.size
        else:
            self.img, self.txt = like.new_zeros(self.size, dim), like.new_zeros(self.size, dim)
            self.ids = torch.full((self.size,), -1, dtype=torch.long, device=like.device)

    def push(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor) -> None:
        if self.img is None:
            self._allocate(img.shape[1], img)
        assert self.img is not None and self.txt is not None and self.ids is not None
        img, txt, ids = img[-self.size :], txt[-self.size :], ids[-self.size :]
        pos = (self.ptr + torch.arange(len(ids), device=ids.device)) % self.size
        self.img[pos.to(self.img.device)] = img.to(self.img.dtype)  # type: ignore[index]
        self.txt[pos.to(self.txt.device)] = txt.to(self.txt.dtype)  # type: ignore[index]
        self.ids[pos.to(self.ids.device)] = ids  # type: ignore[index]
        self.ptr = (self.ptr + len(ids)) % self.size
        self.filled = min(self.size, self.filled + len(ids))

    def rows(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, image ids) of the filled rows (an empty queue: none before the first
        push)."""
        if self.img is None and self.init == "random":
            self._allocate(like.shape[1], like)
        if self.img is None:
            empty = like.new_zeros(0, like.shape[1])
            return empty, empty, torch.zeros(0, dtype=torch.long, device=like.device)
        n = self.filled
        return self.img[:n], self.txt[:n], self.ids[:n]  # type: ignore[index]

    def state(self) -> dict[str, Any]:
        return {"img": self.img.cpu() if self.img is not None else None,
                "txt": self.txt.cpu() if self.txt is not None else None,
                "ids": self.ids.cpu() if self.ids is not None else None, "ptr": self.ptr, "filled": self.filled}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.img, self.txt, self.ids = (state[k].to(device) if state[k] is not None else None
                                        for k in ("img", "txt", "ids"))
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])


class Momentum:
    """The momentum model, its feature queue, and the α of the distillation targets (raised linearly from 0 over
    the first ``warmup_batches`` batches of a phase, as BLIP does over its first epoch)."""

    def __init__(self, mu: float, queue_size: int, alpha: float, warmup_batches: int, masked: bool = False,
                 queue_init: str = "random", seed: int = 0):
        self.mu, self.alpha_max, self.warmup, self.masked = mu, alpha, max(1, warmup_batches), masked
        self.queue = FeatureQueue(queue_size, queue_init, seed)
        self.model: nn.Module | None = None
        self.batches = 0
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def begin(self, student: nn.Module, state: dict[str, Any] | None) -> None:
        """A phase starts: the copy is the student as it is now (or the saved one when resuming)."""
        self.model = _clone(student)
        self._staged.clear()
        self.queue = FeatureQueue(self.queue.size, self.queue.init, self.queue.seed)
        self.batches = 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.queue.load(state["queue"], next(student.parameters()).device)
            self.batches = int(state["batches"])

    def ready(self) -> bool:
        return self.model is not None

    def model_for(self, student: nn.Module) -> nn.Module:
        """The copy: dense, or (``masked``) masked with the student's ζ while the search's masks are on it."""
        assert self.model is not None
        masks = masks_of(student) if self.masked else None
        if masks is not None and masks_of(self.model) is not masks:
            masks.attach(self.model)
        self.model.train(student.training)
        return self.model

    @property
    def alpha(self) -> float:
        return self.alpha_max * min(1.0, self.batches / self.warmup)

    def stage(self, key: int, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor) -> None:
        """Features to enqueue once the optimizer has stepped (a batch run twice, as DDP's first-batch probe
        runs it, counts once)."""
        self._staged[key] = (img.detach(), txt.detach(), ids.detach())

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """m ← μ·m + (1 − μ)·θ for every parameter (buffers copied); the step's features join the queue."""
        assert self.model is not None
        mine = dict(self.model.named_parameters())
        for name, p in student.named_parameters():
            mine[name].mul_(self.mu).add_(p.detach().to(mine[name].dtype), alpha=1.0 - self.mu)
        mine_buf = dict(self.model.named_buffers())
        for name, b in student.named_buffers():
            mine_buf[name].copy_(b)
        for img, txt, ids in self._staged.values():
            self.queue.push(img, txt, ids)
            self.batches += 1
        self._staged.clear()

    def state(self) -> dict[str, Any]:
        assert self.model is not None
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "queue": self.queue.state(), "batches": self.batches}
