"""The one training loop that the search and the retrain share.

The loop owns what both need and must get exactly right for a run to resume after a kill:
seeding, the optimizer and its learning-rate schedule, AMP (with a grad scaler under fp16),
gradient accumulation, the position in the batch stream, the RNG state after the last finished
step, Ctrl-C and periodic checkpoints. What differs between the two lives in a ``Phase``: the
search adds the sparsity term, reads the mask gradients and moves the masks; the retrain
evaluates at the end of each epoch and keeps the best state.

Nothing here reads a value back from the device on every step: losses stay on the device and
are fetched (and averaged over the ranks) once per logging window, so the GPU queue never
drains for a progress line.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .parts import Stream, amp_dtype, autocast, grad_scaler
from ..errors import DivergedError
from .distributed import current, loss_runner, rng_state, set_rng_state

LossFn = Callable[[nn.Module, Any], torch.Tensor]
ProgressFn = Callable[[dict[str, float]], None]
StateFn = Callable[[], dict[str, Any]]
CheckpointFn = Callable[[StateFn], None]


@dataclass
class LoopSettings:
    """How to train: ``total`` optimizer steps, each over ``grad_accum`` batches."""

    total: int
    lr: float
    weight_decay: float
    amp: bool
    seed: int
    schedule: Callable[[int], float] = lambda _step: 1.0  # lr factor after ``step`` optimizer steps
    max_grad_norm: float | None = None
    grad_accum: int = 1
    checkpoint_every: int = 0
    log_every: int | None = None  # None: every step on CPU (free), every 10 on CUDA (a host sync)


class Phase:
    """What the search or the retrain adds to the loop (see ``search.py`` and ``retrain.py``); the hooks a
    phase does not need do nothing."""

    #: the loop logs ``task_loss`` beside ``loss`` (the search's loss adds the sparsity terms)
    logs_task_loss: bool = False

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """The loss to optimise, from the task's loss of one batch."""
        return task_loss

    def after_backward(self, scaler: torch.amp.GradScaler | None) -> None:
        """All batches of the step are back-propagated; the optimizer has not stepped yet."""

    def start(self, resumed_at: int | None) -> None:
        """The weights are in place; training begins (at step ``resumed_at`` of a resumed run, else None)."""

    def after_step(self, step: int) -> dict[str, float]:
        """The optimizer stepped (``step`` counts from 1); returns fields for the step's record."""
        return {}

    def boundary(self, step: int) -> bool:
        """Whether ``step`` ends a stretch (an epoch): the log is flushed and ``finish_step`` does its work."""
        return False

    def finish_step(self, step: int) -> None:
        """After the step is logged (the retrain evaluates here at the end of an epoch)."""

    def sync(self) -> None:
        """Called on every rank before a state is taken (e.g. to reduce pending mask gradients)."""

    def state(self) -> dict[str, Any]:
        """The phase's own part of a checkpoint."""
        return {}

    def checkpoint_due(self, step: int, every: int) -> bool:
        """Whether a checkpoint is written after ``step`` (``every`` > 0)."""
        return step % every == 0


@dataclass
class Throughput:
    """Images/s, step time and the share of wall time spent waiting for the next batch."""

    items: int = 0
    wait_s: float = 0.0
    since: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def fields(self, world: int) -> dict[str, float]:
        now = time.perf_counter()
        wall = max(now - self.since, 1e-9)
        out = {"images_per_s": self.items * world / wall, "step_s": wall / max(self.steps, 1),
               "data_wait": min(1.0, self.wait_s / wall)}
        self.items, self.wait_s, self.steps, self.since = 0, 0.0, 0, now
        return out


def batch_items(batch: Any) -> int:
    """The number of examples in a batch: the leading size of its first tensor."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 0


def reset_peak_memory(device: torch.device) -> None:
    """The GPU's peak starts again (a run's report is its own, not the process's: a second compress in one
    process would show the first one's peak). Host RSS has no reset: its peak is the process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS of this process and, on CUDA, the peak allocated GPU memory since ``reset_peak_memory``
    (MiB)."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"host_rss_mib": rss_kib / (1024 * 1024) if sys.platform == "darwin" else rss_kib / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@contextlib.contextmanager
def deferred_interrupt() -> Any:
    """Ctrl-C inside the block is acted on when the block ends (a second one stops at once).

    A step's weights, optimizer, importance, mask moves, step counter and data position change
    together; an interrupt between them would save a state that a resume applies twice or not at
    all. Only in the main thread and over Python's own handler (a caller's handler is left alone).
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending: list[int] = []

    def later(signum: int, frame: Any) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, later)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def loss_hooks(loss_fn: Any) -> Any:
    """The loss's own training state, if it keeps one: the loss callable (or the object it is a method of) may
    define ``train_begin(model, state)`` (a phase starts; ``state``: what ``train_state()`` returned in the
    interrupted run, else None), ``train_after_step(model)`` (after each optimizer step) and ``train_state()``
    (saved with the loop's state, so a resumed run continues it)."""
    owner = getattr(loss_fn, "__self__", loss_fn)
    if callable(getattr(owner, "training_hooks", None)):  # a wrapper (``Distiller``) forwards its task's
        return owner.training_hooks()
    return owner if callable(getattr(owner, "train_state", None)) else None


class TrainLoop:
    """Trains ``model`` in place for ``settings.total`` optimizer steps with ``phase``'s hooks."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], settings: LoopSettings,
                 phase: Phase, *, progress: ProgressFn | None = None, resume: dict[str, Any] | None = None):
        self.model, self.settings, self.phase, self.progress = model, settings, phase, progress
        self.dist = current()
        self.device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay) if params else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, settings.schedule) if self.opt else None
        self.dtype = amp_dtype(self.device, settings.amp)
        self.scaler = grad_scaler(self.device, self.dtype)
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.batches, self.loss_fn, self.resume = batches, loss_fn, resume
        self.hooks = loss_hooks(loss_fn)
        every = settings.log_every
        self.log_every = every if every is not None else (10 if self.device.type == "cuda" else 1)
        self._pending: list[tuple[dict[str, float], torch.Tensor]] = []
        self._speed, self._totals = Throughput(), Throughput()
        # Seeded before anything the phase runs first (the retrain's epoch-0 evaluation).
        torch.manual_seed(settings.seed + self.dist.rank)

    # -- resume and state ---------------------------------------------------------------------

    def _restore(self) -> Stream:
        r = self.resume
        if r is not None:
            self.model.load_state_dict(r["model"])
            if self.opt is not None:
                self.opt.load_state_dict(r["optimizer"])
                self.sched.load_state_dict(r["scheduler"])  # type: ignore[union-attr]
            self.step, self.history = int(r["step"]), list(r["history"])
            if self.scaler is not None and r.get("scaler"):  # else a resumed fp16 run restarts its scale
                self.scaler.load_state_dict(r["scaler"])
        it = Stream(self.batches, r.get("data") if r is not None else None)
        if r is not None and r.get("data") is None:  # skip the batches the interrupted run trained on
            for _ in range(self.step * self.settings.grad_accum):
                next(it)
        if self.hooks is not None:
            self.hooks.train_begin(self.model, r.get("loss_state") if r is not None else None)
        if r is not None:
            set_rng_state(r["rng"])
        return it

    def state(self) -> dict[str, Any]:
        """The loop's and the phase's state after the last finished step."""
        return {"step": self.step, "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.opt.state_dict() if self.opt else {},
                "scheduler": self.sched.state_dict() if self.sched else {}, "history": list(self.history),
                "rng": self._rng_pos, "data": self._data_pos, **self.phase.state(),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                **({"loss_state": self.hooks.train_state()} if self.hooks is not None else {})}

    # -- logging -----------------------------------------------------------------------------

    def _log(self, rec: dict[str, float], values: torch.Tensor) -> None:
        self._pending.append((rec, values))
        if len(self._pending) >= self.log_every:
            self.flush_log()

    def flush_log(self) -> None:
        """Fetch the pending losses in one transfer (averaged over the ranks) and report them."""
        if not self._pending:
            return
        stacked = torch.stack([v for _, v in self._pending]).float()
        means = self.dist.all_reduce_mean(stacked.cpu()).tolist()
        speed = self._speed.fields(self.dist.world)
        for (rec, _), vals in zip(self._pending, means):
            if not math.isfinite(vals[0]):  # every rank sees the same mean: all stop together
                self._pending.clear()
                raise DivergedError(f"the {type(self.phase).__name__.removesuffix('Phase').lower()} loss is "
                                    f"{vals[0]} at step {int(rec['step'])} (lr {self.lr:.3g}): the run stopped before "
                                    "saving it; a lower --lr trains")
            rec["loss"] = vals[0]
            if self.phase.logs_task_loss:
                rec["task_loss"] = vals[1]
            self.history.append(rec)
        self._pending.clear()
        if self.progress is not None:
            self.progress(self.history[-1] | speed | {"total": float(self.settings.total)})

    # -- the loop ------------------------------------------------------------------------------

    def _no_sync(self, runner: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, the gradient all-reduce runs once per optimizer step, on its last batch."""
        ddp = getattr(runner, "ddp", None)
        return ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()

    def _forward_backward(self, it: Stream, runner: Any) -> torch.Tensor:
        k = self.settings.grad_accum
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        losses = []
        for micro in range(k):
            t0 = time.perf_counter()
            batch = next(it)
            waited, items = time.perf_counter() - t0, batch_items(batch)
            for meter in (self._speed, self._totals):
                meter.wait_s += waited
                meter.items += items
            with self._no_sync(runner, micro == k - 1):
                with autocast(self.device, self.dtype):
                    task_loss = runner(batch)
                loss = self.phase.loss(task_loss) / k
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            losses.append(torch.stack([loss.detach().float() * k, task_loss.detach().float()]))
        return torch.stack(losses).mean(0)

    def _optimizer_step(self) -> None:
        if self.opt is None:
            return
        clip = self.settings.max_grad_norm
        if self.scaler is not None:
            if clip is not None:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.opt.step()
        self.sched.step()  # type: ignore[union-attr]

    def _train_step(self, it: Stream, runner: Any) -> None:
        """One optimizer step and its bookkeeping: a state taken before or after it is consistent."""
        self.model.train()
        values = self._forward_backward(it, runner)
        self.phase.after_backward(self.scaler)
        self._optimizer_step()
        if self.hooks is not None:
            self.hooks.train_after_step(self.model)
        self.step += 1
        self._speed.steps += 1
        self._totals.steps += 1
        self._data_pos, self._rng_pos = it.position(), rng_state()
        rec = {"step": float(self.step), **self.phase.after_step(self.step)}
        self._log(rec, values)

    def run(self, *, checkpoint: CheckpointFn | None = None,
            on_interrupt: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, float]]:
        """Train to ``settings.total`` steps; returns the per-step history (step, loss and the phase's fields).

        On Ctrl-C (single process), ``on_interrupt`` receives the state after the last finished step.
        ``checkpoint`` is called on every rank when the phase says one is due, with a function that builds the state.
        """
        it = self._restore()
        self.phase.start(self.step if self.resume is not None else None)
        self._speed, self._totals = Throughput(), Throughput()
        runner = loss_runner(self.model, self.loss_fn)
        # Position and RNG after the last finished step: an interrupt can land inside a step.
        self._data_pos, self._rng_pos = it.position(), rng_state()
        every = self.settings.checkpoint_every
        try:
            while self.step < self.settings.total:
                with deferred_interrupt():
                    self._train_step(it, runner)
                if self.phase.boundary(self.step):
                    self.flush_log()
                self.phase.finish_step(self.step)
                if checkpoint is not None and every > 0 and self.step < self.settings.total \
                        and self.phase.checkpoint_due(self.step, every):
                    self.flush_log()
                    self.phase.sync()
                    checkpoint(self.state)
            self.flush_log()
            self.phase.sync()
        except KeyboardInterrupt:
            if on_interrupt is not None and self.dist.world == 1:  # alone (a group of one too): nobody to wait for
                self.flush_log()
                self.phase.sync()
                on_interrupt(self.state())
            raise
        return self.history

    def throughput(self) -> dict[str, float]:
        """Over this process's whole run of the loop: images/s (all ranks), seconds per step, data-wait share."""
        return {**self._totals.fields(self.dist.world), "steps": float(self.step)}

    @property
    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0]) if self.sched is not None else 0.0
