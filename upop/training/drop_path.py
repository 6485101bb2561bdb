"""Stochastic depth ("drop path"): in training, each sample skips a residual branch with a probability that grows
linearly with depth, the survivors' branch scaled by 1/keep so that the expectation is unchanged.

DeiT trains with it (rate 0.1 at the last block, 0 at the first); transformers' ViT and DeiT have no such layer, so
the family's adapter names the modules whose output is a residual branch (``Adapter.drop_path_branches``) and a
forward hook scales their output per sample. The hooks act only in training mode: evaluation and export see the
plain model, and nothing is saved with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..errors import ConfigError


def layer_rates(rate: float, depth: int) -> list[float]:
    """The drop rate of each block: 0 at the first, ``rate`` at the last (linear, as DeiT's ``linspace``)."""
    return [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]


def _hook(rate: float) -> Any:
    keep = 1.0 - rate

    def scale(module: nn.Module, _args: Any, out: Any) -> Any:
        if not module.training or rate == 0.0:
            return out
        branch = out[0] if isinstance(out, tuple) else out
        shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
        mask = branch.new_empty(shape).bernoulli_(keep) / keep
        return (branch * mask, *out[1:]) if isinstance(out, tuple) else branch * mask

    return scale


def branches(model: nn.Module, adapter: Any) -> Sequence[Sequence[nn.Module]]:
    """The adapter's residual branches per block, or one line when the family offers none (checked before a run)."""
    layers: Sequence[Sequence[nn.Module]] = adapter.drop_path_branches(model)
    if not layers:
        raise ConfigError(f"--drop-path: {adapter.family} models do not offer it (those that do: "
                          f"{', '.join(_offering())}); drop it")
    return layers


def _offering() -> list[str]:
    from ..adapters import all_adapters
    from ..adapters.base import Adapter

    return [a.family for a in all_adapters() if type(a).drop_path_branches is not Adapter.drop_path_branches]


@contextmanager
def drop_path(model: nn.Module, adapter: Any, rate: float) -> Iterator[None]:
    """Drop path at ``rate`` on the adapter's residual branches for the duration (rate 0: nothing attached)."""
    if not rate:
        yield
        return
    layers = branches(model, adapter)
    handles = [m.register_forward_hook(_hook(r)) for r, branches in zip(layer_rates(rate, len(layers)), layers)
               for m in branches]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["branches", "drop_path", "layer_rates"]
