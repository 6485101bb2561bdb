"""The compressible modules of a model, described without reference to any model class.

An adapter turns a Hugging Face model into a list of ``AttentionSpec`` / ``MLPSpec``; the
search, the masks and the slimming only ever see these and the ``nn.Linear`` layers they name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InProj:
    """A Linear whose output features are laid out [segments][heads][head_dim].

    Separate q/k/v projections have one segment each; BLIP's fused qkv has three.
    """

    name: str
    segments: int = 1


@dataclass(frozen=True)
class AttentionSpec:
    name: str  # the attention module whose size attributes the adapter patches
    tower: str
    role: str  # "self" or "cross"
    in_projs: tuple[InProj, ...]
    out_proj: str
    num_heads: int
    head_dim: int
    kind: str = "attn"

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
        """Parameters one unit removes, read from the real layers.

        A ``dim`` unit is one row per head in every q/k/v segment and the matching input
        columns of the output projection; a ``head`` unit is ``head_dim`` of those.
        """
        per_feature = 0
        for proj in self.in_projs:
            lin = model.get_submodule(proj.name)
            per_feature += proj.segments * (lin.in_features + (1 if lin.bias is not None else 0))
        out = model.get_submodule(self.out_proj)
        per_feature += out.out_features
        width = self.num_heads if granularity == "dim" else self.head_dim
        return float(width * per_feature)


@dataclass(frozen=True)
class MLPSpec:
    name: str
    tower: str
    fc1: str
    fc2: str
    width: int
    role: str = "mlp"
    kind: str = "mlp"

    def num_units(self, granularity: str) -> int:
        return self.width

    def unit_cost(self, model: nn.Module, granularity: str) -> float:
        fc1 = model.get_submodule(self.fc1)
        fc2 = model.get_submodule(self.fc2)
        return float(fc1.in_features + (1 if fc1.bias is not None else 0) + fc2.out_features)


ModuleSpec = AttentionSpec | MLPSpec
