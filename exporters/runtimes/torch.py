"""PyTorch: the model as it trains, timed graph by graph (``upop profile --runtime torch``) and block by block
(calibration). It exports nothing; the compress report measures it itself (``upop.latency.measure.torch_runtime``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from upop.errors import ConfigError

from ..registry import Backend, register


class Torch(Backend):
    name, title, devices = "torch", "PyTorch", ("cpu", "cuda")

    def profile(self, target: str, batches: list[int], device: str, precision: str, warmup: int,
                runs: int) -> list[Any]:
        from upop.api import open_model, resolve_device

        from .. import backends
        from ..timing import profile_torch

        owner = next((b for b in backends() if b.owns(Path(target))), None)
        if owner is not None:
            raise ConfigError(f"{target} is a {owner.title} export: profile it with --runtime {owner.name}")
        src = open_model(target, None)
        return profile_torch(src.model, src.adapter, target, batches, resolve_device(device), precision, warmup, runs)

    def block_timer(self, device: Any, precision: str) -> Any:
        from upop.latency.calibrate import torch_timer

        return torch_timer(device)


register(Torch())
