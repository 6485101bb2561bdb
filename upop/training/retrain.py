"""Retrain of the slim model: AdamW, linear warm-up then cosine to 0 with clipping (or the reference's cosine per
epoch), AMP on CUDA.

The optimizer is always built here, after slimming: an optimizer from before slimming would
hold states shaped like the unslimmed weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..run.config import RetrainConfig
from .loop import CheckpointFn, LoopSettings, LossFn, Phase, ProgressFn, TrainLoop

EvalFn = Callable[[nn.Module], float]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def epoch_cosine(steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """The reference's: epoch e (from 0) trains at ½(1 + cos(π e / epochs)) of the rate, held through the epoch."""
    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step // max(1, steps_per_epoch), epochs) / max(1, epochs)))

    return factor


@dataclass
class RetrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    throughput: dict[str, float] = field(default_factory=dict)  # images/s, step time, data-wait share


class RetrainPhase(Phase):
    """The retrain's hooks on the training loop: an evaluation at the end of every epoch (epoch 0 is
    the slim model before any retraining) and the best state by that evaluation."""

    def __init__(self, model: nn.Module, eval_fn: EvalFn | None, steps_per_epoch: int, resume: dict[str, Any] | None):
        self.model, self.eval_fn, self.steps = model, eval_fn, steps_per_epoch
        self.result = RetrainResult()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.lr: Callable[[], float] = lambda: 0.0
        if resume is not None:
            r = self.result
            r.evals, r.best_metric, r.best_epoch = list(resume["evals"]), resume["best_metric"], resume["best_epoch"]
            self.best_state = resume["best_state"]

    def evaluate(self, epoch: int) -> None:
        if self.eval_fn is None:
            return
        metric = float(self.eval_fn(self.model))
        r = self.result
        best = r.best_metric is None or metric > r.best_metric
        # The copy first, then every field at once: an interrupt in between leaves the previous record whole.
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()} if best else None
        r.evals.append({"epoch": float(epoch), "metric": metric})
        if best:
            r.best_metric, r.best_epoch, self.best_state = metric, epoch, state

    def start(self, resumed_at: int | None) -> None:
        """An interrupted run that stopped inside an end-of-epoch evaluation redoes it."""
        step, evals = resumed_at, self.result.evals
        if step and step % self.steps == 0 and (not evals or evals[-1]["epoch"] < step // self.steps):
            self.evaluate(step // self.steps)

    def after_step(self, step: int) -> dict[str, float]:
        return {"epoch": float((step - 1) // self.steps + 1), "lr": self.lr()}

    def boundary(self, step: int) -> bool:
        return step % self.steps == 0

    def finish_step(self, step: int) -> None:
        if step % self.steps == 0:
            self.evaluate(step // self.steps)

    def checkpoint_due(self, step: int, every: int) -> bool:
        return step % self.steps == 0 or step % every == 0

    def state(self) -> dict[str, Any]:
        r = self.result
        return {"evals": list(r.evals), "best_metric": r.best_metric, "best_epoch": r.best_epoch,
                "best_state": self.best_state}


def retrain_steps(config: RetrainConfig, batches: Iterable[Any]) -> tuple[int, int]:
    """(steps per epoch, total steps): ``steps_per_epoch``, or one pass in steps of ``grad_accum`` batches."""
    if config.steps_per_epoch is not None:
        steps = config.steps_per_epoch
    else:
        steps = max(1, len(batches) // config.grad_accum)  # type: ignore[arg-type]
    total = config.epochs * steps
    return steps, min(total, config.max_steps) if config.max_steps is not None else total


def retrain(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    config: RetrainConfig,
    *,
    eval_fn: EvalFn | None = None,
    progress: ProgressFn | None = None,
    resume: dict[str, Any] | None = None,
    on_interrupt: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: CheckpointFn | None = None,
    checkpoint_every: int = 0,
) -> RetrainResult:
    """Train ``model`` in place; with ``eval_fn`` (higher is better) the best state is kept.

    Epoch 0 is the slim model before any retraining, so retraining can never make the
    returned model worse on the evaluation than what the search left. On Ctrl-C,
    ``on_interrupt`` receives the state after the last finished step; ``resume`` takes it back.
    With ``checkpoint_every`` > 0, ``checkpoint`` is called every that many steps and after each epoch's
    evaluation with a function returning that state. Under torchrun the model trains through DDP; ``eval_fn`` must
    give every rank the same number (the tasks' evaluations gather across ranks).
    """
    config.validate()
    steps, total = retrain_steps(config, batches)
    phase = RetrainPhase(model, eval_fn, steps, resume)
    reference = config.schedule == "epoch-cosine"
    schedule = epoch_cosine(steps, config.epochs) if reference else warmup_cosine(int(config.warmup_ratio * total), total)
    settings = LoopSettings(total=total, lr=config.lr, weight_decay=config.weight_decay, amp=config.amp,
                            seed=config.seed, schedule=schedule, max_grad_norm=None if reference else config.max_grad_norm,
                            grad_accum=config.grad_accum, checkpoint_every=checkpoint_every)
    loop = TrainLoop(model, loss_fn, batches, settings, phase, progress=progress, resume=resume)
    phase.lr = lambda: loop.lr
    if resume is None:
        phase.evaluate(0)
    if total == 0:
        return phase.result
    loop.run(checkpoint=checkpoint, on_interrupt=on_interrupt)
    if checkpoint is not None:  # the end of the retrain: a crash after it does not redo the retrain
        checkpoint(loop.state)
    phase.result.history, phase.result.throughput = loop.history, loop.throughput()
    if phase.best_state is not None:
        model.load_state_dict(phase.best_state)
    model.eval()
    return phase.result
