"""Physical slimming: slice every Linear to the kept units, then let the adapter patch sizes.

Works on ``ModuleSpec`` lists and ``nn.Linear`` only; which attributes a family's forward
reads is the adapter's business (``SizePatcher``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from .units import AttentionSpec, MLPSpec, ModuleSpec


class SizePatcher(Protocol):
    def patch_attention(self, model: nn.Module, spec: AttentionSpec, num_heads: int, head_dim: int) -> None: ...

    def patch_mlp(self, model: nn.Module, spec: MLPSpec, width: int) -> None: ...


def _keep_rows(lin: nn.Linear, idx: torch.Tensor, scale: torch.Tensor | None) -> None:
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach()[idx].clone()
    b = lin.bias.detach()[idx].clone() if lin.bias is not None else None
    if scale is not None:
        scale = scale.to(w.device, w.dtype)
        w *= scale[:, None]
        if b is not None:
            b *= scale
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)  # type: ignore[union-attr]
    lin.out_features = int(idx.numel())


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach()[:, idx].clone(), requires_grad=lin.weight.requires_grad)
    lin.in_features = int(idx.numel())


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

    Mask values of kept units that are not 1 are folded into the q/k/v rows (or fc1 rows):
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
        if isinstance(spec, AttentionSpec):
            feat = spec.feature_index(keep, granularity)
            # Same [heads][head_dim] layout as the kept features, so expand_mask applies as is.
            feat_scale = spec.expand_mask(fold, granularity) if fold is not None else None
            width = spec.num_heads * spec.head_dim
            for proj in spec.in_projs:
                lin = model.get_submodule(proj.name)
                idx = torch.cat([feat + s * width for s in range(proj.segments)])
                scale = feat_scale.repeat(proj.segments) if feat_scale is not None else None
                _keep_rows(lin, idx, scale)
            _keep_cols(model.get_submodule(spec.out_proj), feat)
            heads, head_dim = spec.kept_shape(len(keep), granularity)
            patcher.patch_attention(model, spec, heads, head_dim)
        else:
            idx = torch.tensor(keep, dtype=torch.long)
            _keep_rows(model.get_submodule(spec.fc1), idx, fold)
            _keep_cols(model.get_submodule(spec.fc2), idx)
            patcher.patch_mlp(model, spec, len(keep))
    return model
