"""Parameters and FLOPs, per tower.

FLOPs are counted with ``torch.utils.flop_counter`` on eager attention: the CPU SDPA kernel is
not in the counter's table, so an SDPA forward would silently leave attention out.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..adapters import Adapter


def params_per_tower(model: nn.Module, adapter: Adapter) -> dict[str, int]:
    """Unique parameters (tied weights counted once), grouped by tower, plus ``total``."""
    seen: set[int] = set()
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[adapter.tower_of(name)] += p.numel()
    result = dict(sorted(out.items()))
    result["total"] = sum(out.values())
    return result


def compressible_params(model: nn.Module, adapter: Adapter) -> int:
    """Parameters inside the compressible Linears (each unit kind's ``linears``)."""
    total = 0
    for s in adapter.modules(model):
        for n in s.linears():
            total += sum(p.numel() for p in model.get_submodule(n).parameters())
    return total


@contextmanager
def eager_attention(model: nn.Module):
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)  # type: ignore[operator]


def flops_per_tower(model: nn.Module, adapter: Adapter, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """FLOPs of one forward on ``batch``, grouped by tower, plus ``total``."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=1 + max((k.count(".") + 1 for k in adapter.towers), default=1))
    with eager_attention(model), torch.no_grad(), counter:
        model(**batch)
    model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out: dict[str, int] = defaultdict(int)
    for key, per_op in counts.items():
        head, _, path = key.partition(".")
        if head == root and _counted(path, adapter.towers):
            out[adapter.tower_of(path)] += int(sum(per_op.values()))
    total = int(sum(counts.get("Global", {}).values()))
    attributed = sum(out.values())
    if total > attributed:
        out["other"] += total - attributed
    result = dict(sorted(out.items()))
    result["total"] = total
    return result


def _counted(path: str, towers: dict[str, str]) -> bool:
    """A module whose FLOPs count once: a tower's (dotted) root, or a top-level module that contains no tower root
    (a family whose towers all sit under one attribute, as transformers' VLMs under ``model``, counts them apart)."""
    if path in towers:
        return True
    return bool(path) and "." not in path and not any(k.startswith(path + ".") for k in towers)
