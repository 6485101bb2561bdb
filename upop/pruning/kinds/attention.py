"""Multi-head attention, self or cross: q/k/v projections laid out [segments][heads][head_dim], one output.

Granularity ``head``: a unit is a head (its ``head_dim`` rows in every q/k/v segment and its columns of
the output projection). Granularity ``dim``: a unit is one head dimension shared by every head (the rows
at that offset in every head, and their output columns). Masks scale q, k and v right after the
projections (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import ATTENTION, UnitKind, keep_cols, keep_rows, linear, output_mask_hook, row_cost


@dataclass(frozen=True)
class InProj:
    """A Linear whose output features are laid out [segments][heads][head_dim].

    Separate q/k/v projections have one segment each; BLIP's fused qkv has three.
    """

    name: str
    segments: int = 1


@dataclass(frozen=True)
class AttentionSpec(UnitKind):
    kind = "attn"
    group = ATTENTION

    name: str  # the attention module whose size attributes the adapter patches
    tower: str
    role: str  # "self" or "cross"
    in_projs: tuple[InProj, ...]
    out_proj: str
    num_heads: int
    head_dim: int

    def num_units(self, granularity: str) -> int:
        return self.head_dim if granularity == "dim" else self.num_heads

    def feature_index(self, kept: list[int], granularity: str) -> torch.Tensor:
        """Output-feature indices (one segment) of the q/k/v projections that the kept units own."""
        if granularity == "dim":
            idx = [h * self.head_dim + d for h in range(self.num_heads) for d in kept]
        else:
            idx = [h * self.head_dim + d for h in kept for d in range(self.head_dim)]
        return torch.tensor(idx, dtype=torch.long)

    def expand_mask(self, zeta: torch.Tensor, granularity: str) -> torch.Tensor:
        """Per-unit mask -> per-output-feature mask of one segment ([heads][head_dim] layout)."""
        if granularity == "dim":
            return zeta.repeat(self.num_heads)
        return zeta.repeat_interleave(self.head_dim)

    def kept_shape(self, n_kept: int, granularity: str) -> tuple[int, int]:
        """(num_heads, head_dim) after keeping ``n_kept`` units."""
        return (self.num_heads, n_kept) if granularity == "dim" else (n_kept, self.head_dim)

    def unit_cost(self, model: nn.Module, granularity: str) -> float:
        """A ``dim`` unit is one row per head in every q/k/v segment and the matching input columns of
        the output projection; a ``head`` unit is ``head_dim`` of those."""
        per_feature = sum(p.segments * row_cost(linear(model, p.name)) for p in self.in_projs)
        per_feature += linear(model, self.out_proj).out_features
        width = self.num_heads if granularity == "dim" else self.head_dim
        return float(width * per_feature)

    def linears(self) -> list[str]:
        return [p.name for p in self.in_projs] + [self.out_proj]

    def attach(self, model: nn.Module, zeta: nn.Parameter, granularity: str) -> list[Any]:
        return [linear(model, p.name).register_forward_hook(
                    output_mask_hook(lambda s=p.segments: self.expand_mask(zeta, granularity).repeat(s)))
                for p in self.in_projs]

    def slim(self, model: nn.Module, keep: list[int], granularity: str, fold: torch.Tensor | None, patcher: Any) -> None:
        feat = self.feature_index(keep, granularity)
        # Same [heads][head_dim] layout as the kept features, so expand_mask applies as is.
        feat_scale = self.expand_mask(fold, granularity) if fold is not None else None
        width = self.num_heads * self.head_dim
        for proj in self.in_projs:
            idx = torch.cat([feat + s * width for s in range(proj.segments)])
            scale = feat_scale.repeat(proj.segments) if feat_scale is not None else None
            keep_rows(linear(model, proj.name), idx, scale)
        keep_cols(linear(model, self.out_proj), feat)
        heads, head_dim = self.kept_shape(len(keep), granularity)
        patcher.patch_attention(model, self, heads, head_dim)

    def magnitude(self, model: nn.Module, granularity: str) -> torch.Tensor:
        width = self.num_heads * self.head_dim
        per_feat = torch.zeros(width, dtype=torch.float64)
        for proj in self.in_projs:
            w = linear(model, proj.name).weight.detach().abs().sum(1).double().cpu()
            per_feat += w.view(proj.segments, width).sum(0)
        per_feat += linear(model, self.out_proj).weight.detach().abs().sum(0).double().cpu()
        grid = per_feat.view(self.num_heads, self.head_dim)
        return grid.sum(0) if granularity == "dim" else grid.sum(1)

    def shape(self) -> dict[str, int]:
        return {"num_heads": self.num_heads, "head_dim": self.head_dim}

    def kept_fields(self, n_kept: int, granularity: str) -> dict[str, int]:
        heads, head_dim = self.kept_shape(n_kept, granularity)
        return {"num_heads": heads, "head_dim": head_dim}

    @classmethod
    def shape_text(cls, row: dict[str, Any]) -> str:
        return f"{row['num_heads']} × {row['head_dim']}"

    def paper_cost(self, attn_weight: float, granularity: str) -> float:
        return float(attn_weight) * (self.head_dim if granularity == "head" else 1)

    def allowed_sizes(self, granularity: str, alignment: Any) -> list[int]:
        n = self.num_units(granularity)
        if granularity == "dim":
            return [k for k in range(1, n + 1)
                    if k % alignment.head_dim_multiple == 0 and alignment.head_dim_min <= k <= alignment.head_dim_max]
        return list(range(1, n + 1))  # whole heads keep head_dim as it was

    def block_tokens(self, tq: int, tkv: int) -> tuple[int, int]:
        return tq, tkv

    def signature(self, model: nn.Module, granularity: str) -> dict[str, Any]:
        first = linear(model, self.in_projs[0].name)
        last = linear(model, self.in_projs[-1].name)
        return {"kind": self.kind, "granularity": granularity, "d_q": first.in_features, "d_kv": last.in_features,
                "d_out": linear(model, self.out_proj).out_features, "heads": self.num_heads,
                "head_dim": self.head_dim}

    def unit_flops_acts(self, model: nn.Module, granularity: str, tq: int, tkv: int, batch: int) -> tuple[float, float]:
        width = self.num_heads if granularity == "dim" else self.head_dim
        flops = 0.0
        for i, proj in enumerate(self.in_projs):
            lin = linear(model, proj.name)
            if proj.segments == 3:  # fused qkv on the query tokens
                flops += 3 * 2 * batch * tq * lin.in_features
            else:
                flops += 2 * batch * (tq if i == 0 else tkv) * lin.in_features
        flops += 2 * batch * tq * linear(model, self.out_proj).out_features
        flops += 2 * 2 * batch * tq * tkv  # q·kᵀ and p·v, per head dimension
        acts = batch * (2 * tq + 2 * tkv)
        return flops * width, acts * width

    @classmethod
    def block(cls, sig: dict[str, Any], width: int) -> nn.Module:
        heads, hd = (sig["heads"], width) if sig["granularity"] == "dim" else (width, sig["head_dim"])
        return _Attention(sig["d_q"], sig["d_kv"], sig["d_out"], heads, hd, sig["head_dim"] ** -0.5)

    @classmethod
    def block_widths(cls, sig: dict[str, Any]) -> tuple[int, int | None]:
        return sig["d_q"], sig["d_kv"]


class _Attention(nn.Module):
    """The calibration stand-in: separate q/k/v, SDPA at the original scale, the output projection."""

    def __init__(self, d_q: int, d_kv: int, d_out: int, heads: int, head_dim: int, scale: float):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, scale
        self.q, self.o = nn.Linear(d_q, heads * head_dim), nn.Linear(heads * head_dim, d_out)
        self.k, self.v = nn.Linear(d_kv, heads * head_dim), nn.Linear(d_kv, heads * head_dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))
