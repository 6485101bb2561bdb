"""Physical slimming: slice every Linear to the kept units, then let the adapter patch sizes.

Works on unit kinds only: each slices its own Linears (``upop.pruning.kinds``); which attributes a family's
forward reads is the adapter's business (``SizePatcher``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .kinds import SizePatcher
from .units import ModuleSpec

__all__ = ["SizePatcher", "slim_model"]


def _fold(values: Sequence[float] | None, kept: Sequence[int]) -> torch.Tensor | None:
    """Mask values of the kept units, or None when they are all 1 (nothing to fold)."""
    if values is None:
        return None
    z = torch.tensor([float(values[i]) for i in kept], dtype=torch.float64)
    return None if bool((z == 1).all()) else z


def slim_model(
    model: nn.Module,
    specs: Sequence[ModuleSpec],
    kept: Mapping[str, Sequence[int]],
    granularity: str,
    patcher: SizePatcher,
    zeta: Mapping[str, Sequence[float]] | None = None,
) -> nn.Module:
    """Slim ``model`` in place to the ``kept`` units of every module and return it.

    Mask values of kept units that are not 1 are folded into the rows the mask scaled (q/k/v, fc1, up):
    ζ·(Wx + b) = (ζW)x + ζb, so the slim model computes what the masked model computed.
    """
    for spec in specs:
        keep = sorted(int(i) for i in kept[spec.name])
        n_units = spec.num_units(granularity)
        if not keep:
            raise ValueError(f"module {spec.name} would keep no unit; every module keeps at least one")
        if keep[-1] >= n_units or keep[0] < 0 or len(set(keep)) != len(keep):
            raise ValueError(f"module {spec.name}: kept units {keep} do not fit its {n_units} units")
        fold = _fold(zeta.get(spec.name) if zeta else None, keep)
        spec.slim(model, keep, granularity, fold, patcher)
    return model
