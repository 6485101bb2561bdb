"""A gated MLP (SwiGLU, as in Llama, Qwen2, Mistral): down(act(gate(x)) · up(x)).

A unit is one hidden neuron: a row of gate_proj and of up_proj and a column of down_proj. Its mask
scales up_proj's output, so ζ·act(g)·u = act(g)·(ζu) folds into up_proj's row exactly (masking the
gate would pass ζ through the activation, which does not fold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import MLP, UnitKind, col_l1, keep_cols, keep_rows, linear, output_mask_hook, row_cost, row_l1


@dataclass(frozen=True)
class GatedMLPSpec(UnitKind):
    kind = "gated_mlp"
    group = MLP

    name: str
    tower: str
    gate: str
    up: str
    down: str
    width: int
    role: str = "mlp"

    def num_units(self, granularity: str) -> int:
        return self.width

    def unit_cost(self, model: nn.Module, granularity: str) -> float:
        gate, up, down = (linear(model, n) for n in (self.gate, self.up, self.down))
        return float(row_cost(gate) + row_cost(up) + down.out_features)

    def linears(self) -> list[str]:
        return [self.gate, self.up, self.down]

    def attach(self, model: nn.Module, zeta: nn.Parameter, granularity: str) -> list[Any]:
        return [linear(model, self.up).register_forward_hook(output_mask_hook(lambda: zeta))]

    def slim(self, model: nn.Module, keep: list[int], granularity: str, fold: torch.Tensor | None, patcher: Any) -> None:
        idx = torch.tensor(keep, dtype=torch.long)
        keep_rows(linear(model, self.gate), idx, None)
        keep_rows(linear(model, self.up), idx, fold)
        keep_cols(linear(model, self.down), idx)
        patcher.patch_mlp(model, self, len(keep))

    def magnitude(self, model: nn.Module, granularity: str) -> torch.Tensor:
        return row_l1(model, self.gate) + row_l1(model, self.up) + col_l1(model, self.down)

    def shape(self) -> dict[str, int]:
        return {"width": self.width}

    def allowed_sizes(self, granularity: str, alignment: Any) -> list[int]:
        return list(range(alignment.mlp_multiple, self.width + 1, alignment.mlp_multiple))

    def signature(self, model: nn.Module, granularity: str) -> dict[str, Any]:
        return {"kind": self.kind, "d_in": linear(model, self.up).in_features,
                "d_out": linear(model, self.down).out_features}

    def unit_flops_acts(self, model: nn.Module, granularity: str, tq: int, tkv: int, batch: int) -> tuple[float, float]:
        d_in, d_out = linear(model, self.up).in_features, linear(model, self.down).out_features
        return 2 * batch * tq * (2 * d_in + d_out), 3 * batch * tq

    @classmethod
    def block(cls, sig: dict[str, Any], width: int) -> nn.Module:
        return _GatedMLP(sig["d_in"], width, sig["d_out"])


class _GatedMLP(nn.Module):
    def __init__(self, d_in: int, width: int, d_out: int):
        super().__init__()
        self.gate, self.up = nn.Linear(d_in, width, bias=False), nn.Linear(d_in, width, bias=False)
        self.down = nn.Linear(width, d_out, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # kv unused: the blocks share one signature
        return self.down(F.silu(self.gate(x)) * self.up(x))
