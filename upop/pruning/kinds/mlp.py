"""A plain MLP: fc1 (rows) → activation → fc2 (columns). A unit is one hidden neuron; its mask scales
fc1's output, before the activation, so it folds into fc1's row exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import MLP, UnitKind, keep_cols, keep_rows, linear, output_mask_hook, row_cost


@dataclass(frozen=True)
class MLPSpec(UnitKind):
    kind = "mlp"
    group = MLP

    name: str
    tower: str
    fc1: str
    fc2: str
    width: int
    role: str = "mlp"

    def num_units(self, granularity: str) -> int:
        return self.width

    def unit_cost(self, model: nn.Module, granularity: str) -> float:
        return float(row_cost(linear(model, self.fc1)) + linear(model, self.fc2).out_features)

    def linears(self) -> list[str]:
        return [self.fc1, self.fc2]

    def attach(self, model: nn.Module, zeta: nn.Parameter, granularity: str) -> list[Any]:
        return [linear(model, self.fc1).register_forward_hook(output_mask_hook(lambda: zeta))]

    def slim(self, model: nn.Module, keep: list[int], granularity: str, fold: torch.Tensor | None, patcher: Any) -> None:
        idx = torch.tensor(keep, dtype=torch.long)
        keep_rows(linear(model, self.fc1), idx, fold)
        keep_cols(linear(model, self.fc2), idx)
        patcher.patch_mlp(model, self, len(keep))

    def magnitude(self, model: nn.Module, granularity: str) -> torch.Tensor:
        fc1 = linear(model, self.fc1).weight.detach().abs().sum(1)
        fc2 = linear(model, self.fc2).weight.detach().abs().sum(0)
        return (fc1 + fc2).double().cpu()

    def shape(self) -> dict[str, int]:
        return {"width": self.width}

    def allowed_sizes(self, granularity: str, alignment: Any) -> list[int]:
        return list(range(alignment.mlp_multiple, self.width + 1, alignment.mlp_multiple))

    def signature(self, model: nn.Module, granularity: str) -> dict[str, Any]:
        fc1, fc2 = linear(model, self.fc1), linear(model, self.fc2)
        return {"kind": self.kind, "d_in": fc1.in_features, "d_out": fc2.out_features}

    def unit_flops_acts(self, model: nn.Module, granularity: str, tq: int, tkv: int, batch: int) -> tuple[float, float]:
        fc1, fc2 = linear(model, self.fc1), linear(model, self.fc2)
        return 2 * batch * tq * (fc1.in_features + fc2.out_features), 2 * batch * tq

    @classmethod
    def block(cls, sig: dict[str, Any], width: int) -> nn.Module:
        return _MLP(sig["d_in"], width, sig["d_out"])


class _MLP(nn.Module):
    def __init__(self, d_in: int, width: int, d_out: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, width), nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:  # kv unused: the blocks share one signature
        return self.fc2(F.gelu(self.fc1(x)))
