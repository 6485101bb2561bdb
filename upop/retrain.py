"""Retrain of the slim model: AdamW, linear warm-up then cosine to 0, clipping, AMP on CUDA.

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

from ._train import Stream, amp_dtype, autocast
from .distributed import current, loss_runner, rng_state, set_rng_state
from .config import RetrainConfig
from .search import LossFn, ProgressFn

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


@dataclass
class RetrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None


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
    checkpoint: Callable[[Callable[[], dict[str, Any]]], None] | None = None,
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
    dist = current()
    torch.manual_seed(config.seed + dist.rank)
    result = RetrainResult()
    steps = config.steps_per_epoch if config.steps_per_epoch is not None else len(batches)  # type: ignore[arg-type]
    total = config.epochs * steps
    best_state: dict[str, torch.Tensor] | None = None

    def evaluate(epoch: int) -> None:
        nonlocal best_state
        if eval_fn is None:
            return
        metric = float(eval_fn(model))
        result.evals.append({"epoch": float(epoch), "metric": metric})
        if result.best_metric is None or metric > result.best_metric:
            result.best_metric, result.best_epoch = metric, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    if resume is None:
        evaluate(0)
    else:
        result.evals, result.history = list(resume["evals"]), list(resume["history"])
        result.best_metric, result.best_epoch = resume["best_metric"], resume["best_epoch"]
        best_state = resume["best_state"]
    if total == 0:
        return result
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(config.warmup_ratio * total), total))
    dtype = amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    step = 0
    it = Stream(batches, resume.get("data") if resume is not None else None)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        step = int(resume["step"])
        if resume.get("data") is None:  # skip the batches the interrupted run trained on
            for _ in range(step):
                next(it)
        set_rng_state(resume["rng"])
        if step % steps == 0 and step and (not result.evals or result.evals[-1]["epoch"] < step // steps):
            evaluate(step // steps)  # the interrupted run stopped inside this evaluation

    def state() -> dict[str, Any]:
        return {"step": step, "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "evals": list(result.evals),
                "history": list(result.history), "best_metric": result.best_metric, "best_epoch": result.best_epoch,
                "best_state": best_state, "rng": rng_pos, "data": data_pos}

    run_loss = loss_runner(model, loss_fn)
    data_pos, rng_pos = it.position(), rng_state()  # after the last finished step

    try:
        while step < total:
            epoch = step // steps + 1
            model.train()
            batch = next(it)
            with autocast(device, dtype):
                loss = run_loss(batch)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
            sched.step()
            step += 1
            data_pos, rng_pos = it.position(), rng_state()
            rec = {"step": float(step), "epoch": float(epoch),
                   "loss": float(dist.all_reduce_mean(loss.detach().float().reshape(1).cpu())),
                   "lr": float(sched.get_last_lr()[0])}
            result.history.append(rec)
            if progress is not None:
                progress(rec | {"total": float(total)})
            if step % steps == 0:
                evaluate(epoch)
            if checkpoint is not None and checkpoint_every > 0 and step < total and (
                    step % steps == 0 or step % checkpoint_every == 0):
                checkpoint(state)
    except KeyboardInterrupt:
        if on_interrupt is not None and not dist.enabled:
            on_interrupt(state())
        raise
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result
