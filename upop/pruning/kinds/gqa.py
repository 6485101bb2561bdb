"""Grouped-query attention (transformers' Llama, Qwen2, Mistral): ``num_heads`` query heads share
``num_kv_heads`` key/value heads (``repeat_kv``), with rotary position embeddings on q and k.

Granularity ``head``: a unit is one KV group, its key and value head with the ``num_heads / num_kv_heads``
query heads that read it. A single query head within a group is not a unit: ``repeat_kv`` needs the same
number of query heads in every group. Granularity ``dim``: a unit is one rotary pair of head dimensions
(d, d + head_dim/2), shared by every q, k and v head: ``rotate_half`` mixes exactly those two, so they
are kept or removed together. After slimming the kept first halves come first, then the kept second
halves, so ``rotate_half`` still pairs them; the size patch slices the layer's cos/sin to the same
dimensions and leaves the attention's scaling at the original head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import ATTENTION, UnitKind, keep_cols, keep_rows, linear, output_mask_hook, row_cost


@dataclass(frozen=True)
class GQASpec(UnitKind):
    kind = "gqa"
    group = ATTENTION

    name: str
    tower: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    role: str = "self"

    @property
    def groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def num_units(self, granularity: str) -> int:
        return self.head_dim // 2 if granularity == "dim" else self.num_kv_heads

    def dims(self, kept: Sequence[int]) -> torch.Tensor:
        """Head dimensions the kept rotary pairs own: the first halves, then the second halves."""
        kept = sorted(int(k) for k in kept)
        return torch.tensor(kept + [k + self.head_dim // 2 for k in kept], dtype=torch.long)

    def _features(self, heads: range | list[int], dims: torch.Tensor) -> torch.Tensor:
        return torch.cat([h * self.head_dim + dims for h in heads]) if len(heads) else dims[:0]

    def feature_index(self, kept: Sequence[int], granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Output features of (q, k/v) the kept units own."""
        if granularity == "dim":
            d = self.dims(kept)
            return self._features(range(self.num_heads), d), self._features(range(self.num_kv_heads), d)
        every = torch.arange(self.head_dim)
        q_heads = [g * self.groups + i for g in sorted(kept) for i in range(self.groups)]
        return self._features(q_heads, every), self._features(sorted(kept), every)

    def expand_mask(self, zeta: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-unit values -> per-feature values of (q, k/v), in the layout of ``feature_index``."""
        if granularity == "dim":
            per_dim = torch.cat([zeta, zeta])
            return per_dim.repeat(self.num_heads), per_dim.repeat(self.num_kv_heads)
        return zeta.repeat_interleave(self.groups * self.head_dim), zeta.repeat_interleave(self.head_dim)

    def unit_cost(self, model: nn.Module, granularity: str) -> float:
        q, k, v, o = (linear(model, n) for n in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))
        per_q_dim, per_kv_dim = row_cost(q) + o.out_features, row_cost(k) + row_cost(v)
        if granularity == "dim":
            return float(2 * (self.num_heads * per_q_dim + self.num_kv_heads * per_kv_dim))
        return float(self.head_dim * (self.groups * per_q_dim + per_kv_dim))

    def linears(self) -> list[str]:
        return [self.q_proj, self.k_proj, self.v_proj, self.o_proj]

    def attach(self, model: nn.Module, zeta: nn.Parameter, granularity: str) -> list[Any]:
        q_hook = output_mask_hook(lambda: self.expand_mask(zeta, granularity)[0])
        kv_hook = output_mask_hook(lambda: self.expand_mask(zeta, granularity)[1])
        return [linear(model, self.q_proj).register_forward_hook(q_hook),
                linear(model, self.k_proj).register_forward_hook(kv_hook),
                linear(model, self.v_proj).register_forward_hook(kv_hook)]

    def slim(self, model: nn.Module, keep: list[int], granularity: str, fold: torch.Tensor | None, patcher: Any) -> None:
        q_idx, kv_idx = self.feature_index(keep, granularity)
        q_scale, kv_scale = self.expand_mask(fold, granularity) if fold is not None else (None, None)
        keep_rows(linear(model, self.q_proj), q_idx, q_scale)
        keep_rows(linear(model, self.k_proj), kv_idx, kv_scale)
        keep_rows(linear(model, self.v_proj), kv_idx, kv_scale)
        keep_cols(linear(model, self.o_proj), q_idx)
        patcher.patch_gqa(model, self, keep, granularity)

    def magnitude(self, model: nn.Module, granularity: str) -> torch.Tensor:
        def l1(name: str, axis: int, heads: int) -> torch.Tensor:
            w = linear(model, name).weight.detach().abs().sum(axis).double().cpu()
            return w.view(heads, self.head_dim)

        q = l1(self.q_proj, 1, self.num_heads) + l1(self.o_proj, 0, self.num_heads)
        kv = l1(self.k_proj, 1, self.num_kv_heads) + l1(self.v_proj, 1, self.num_kv_heads)
        if granularity == "dim":
            per_dim = q.sum(0) + kv.sum(0)
            half = self.head_dim // 2
            return per_dim[:half] + per_dim[half:]
        return q.view(self.num_kv_heads, -1).sum(1) + kv.sum(1)

    def shape(self) -> dict[str, int]:
        return {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}

    def kept_fields(self, n_kept: int, granularity: str) -> dict[str, int]:
        if granularity == "dim":
            return {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": 2 * n_kept}
        return {"num_heads": n_kept * self.groups, "num_kv_heads": n_kept, "head_dim": self.head_dim}

    @classmethod
    def shape_text(cls, row: dict[str, Any]) -> str:
        return f"{row['num_heads']} q / {row['num_kv_heads']} kv × {row['head_dim']}"

    def paper_cost(self, attn_weight: float, granularity: str) -> float:
        return float(attn_weight) * (self.groups * self.head_dim if granularity == "head" else 2)

    def allowed_sizes(self, granularity: str, alignment: Any) -> list[int]:
        n = self.num_units(granularity)
        if granularity == "dim":
            return [k for k in range(1, n + 1) if (2 * k) % alignment.head_dim_multiple == 0
                    and alignment.head_dim_min <= 2 * k <= alignment.head_dim_max]
        return list(range(1, n + 1))

    def block_tokens(self, tq: int, tkv: int) -> tuple[int, int]:
        return tq, tkv

    def signature(self, model: nn.Module, granularity: str) -> dict[str, Any]:
        return {"kind": self.kind, "granularity": granularity, "d_in": linear(model, self.q_proj).in_features,
                "d_out": linear(model, self.o_proj).out_features, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim}

    def unit_flops_acts(self, model: nn.Module, granularity: str, tq: int, tkv: int, batch: int) -> tuple[float, float]:
        d_in, d_out = linear(model, self.q_proj).in_features, linear(model, self.o_proj).out_features
        # per head dimension of one query head (projections in and out, q·kᵀ and p·v) and of one KV head
        q_flops, kv_flops = 2 * batch * tq * (d_in + d_out) + 4 * batch * tq * tkv, 2 * 2 * batch * tkv * d_in
        q_acts, kv_acts = 2 * batch * tq, 2 * batch * tkv
        if granularity == "dim":
            h, kv = 2 * self.num_heads, 2 * self.num_kv_heads
        else:
            h, kv = self.head_dim * self.groups, self.head_dim
        return h * q_flops + kv * kv_flops, h * q_acts + kv * kv_acts

    @classmethod
    def block(cls, sig: dict[str, Any], width: int) -> nn.Module:
        groups = sig["heads"] // sig["kv_heads"]
        if sig["granularity"] == "dim":
            heads, kv_heads, hd = sig["heads"], sig["kv_heads"], 2 * width
        else:
            heads, kv_heads, hd = width * groups, width, sig["head_dim"]
        return _GQA(sig["d_in"], sig["d_out"], heads, kv_heads, hd, sig["head_dim"] ** -0.5)


def rotary_pre_hook(dims: torch.Tensor):
    """A forward pre-hook (with kwargs) that keeps ``dims`` of the (cos, sin) position embeddings the
    attention module receives, so they line up with its slimmed q and k."""
    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if "position_embeddings" in kwargs:
            kwargs["position_embeddings"] = _index(kwargs["position_embeddings"], dims)
        elif len(args) > 1:
            args = (args[0], _index(args[1], dims), *args[2:])
        return args, kwargs

    return hook


def _index(pe: tuple[torch.Tensor, torch.Tensor], dims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = pe
    idx = dims.to(cos.device)
    return cos.index_select(-1, idx), sin.index_select(-1, idx)


def patch_rotary_attention(model: nn.Module, spec: GQASpec, kept: Sequence[int], granularity: str) -> None:
    """The size patch of transformers' rotary GQA modules (they read ``head_dim`` and ``num_key_value_groups``
    from attributes and take the scaling fixed at construction). Whole groups leave the group size as it was."""
    if granularity != "dim":
        return
    mod, dims = model.get_submodule(spec.name), spec.dims(kept)  # the attention module, not a Linear
    mod.head_dim = int(dims.numel())
    mod.register_forward_pre_hook(rotary_pre_hook(dims), with_kwargs=True)


class _GQA(nn.Module):
    """The calibration stand-in: q with ``heads``, k/v with ``kv_heads`` repeated, SDPA at the original scale."""

    def __init__(self, d_in: int, d_out: int, heads: int, kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.heads, self.kv_heads, self.scale = heads, kv_heads, scale
        self.q, self.o = nn.Linear(d_in, heads * head_dim, bias=False), nn.Linear(heads * head_dim, d_out, bias=False)
        self.k, self.v = nn.Linear(d_in, kv_heads * head_dim, bias=False), nn.Linear(d_in, kv_heads * head_dim, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # kv unused: self attention
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, -1).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, -1).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))
