"""A module exported to ONNX for exactly the shapes of its inputs: what block timing runs in ONNX Runtime
and builds into TensorRT engines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _Positional(nn.Module):
    """Calls a module with keyword inputs given positionally (what the ONNX exporter passes)."""

    def __init__(self, module: nn.Module, names: Sequence[str], pick: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.module, self.names, self.pick = module, list(names), pick

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.pick(self.module(**dict(zip(self.names, args))))


def export_static_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], path: str | Path,
                       pick: Callable[[Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``module`` as an ONNX graph for exactly these input shapes (what the ORT and TensorRT block timings
    run); returns the inputs on the CPU, named as the graph's inputs. The module is exported on the CPU and
    goes back where it was (the PyTorch timings and training that follow expect it there)."""
    import warnings

    home = _device_of(module)
    cpu_inputs = {k: v.detach().cpu() for k, v in inputs.items()}
    try:
        wrapper = _Positional(module.cpu().eval(), list(cpu_inputs), pick or (lambda out: out))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(cpu_inputs.values()), str(path), input_names=list(cpu_inputs),
                              opset_version=17, dynamo=False)
    finally:
        module.to(home)
    return cpu_inputs


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))
