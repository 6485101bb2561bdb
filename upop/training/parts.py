"""Small pieces shared by the search and the retrain loops."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def bf16_native() -> bool:
    """Whether the current GPU computes in bf16 itself. PyTorch's default also says yes on GPUs that only
    emulate it (V100, T4), where bf16 runs slowly and the fp16 path with its grad scaler is the one to take."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch before the argument: Ampere (compute capability 8) is the first with bf16
        return torch.cuda.get_device_capability() >= (8, 0)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU has it natively, else fp16 (with a grad scaler); None on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if bf16_native() else torch.float16


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A grad scaler under fp16 autocast (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def cycle(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate over ``batches`` again and again (a DataLoader reshuffles on each pass)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("no batches to train on")


class Stream:
    """Endless batches with a position that a checkpoint can hold and a resumed run start from.

    A ``Batches`` resumes at once from its own position; any other iterable is re-iterated and
    the batches already trained on are skipped.
    """

    def __init__(self, batches: Iterable[Any], position: dict[str, Any] | None = None):
        self.taken = int(position["taken"]) if position else 0
        self._source = batches if hasattr(batches, "endless") else None
        if self._source is not None:
            self._it = self._source.endless(position.get("sampler") if position else None)
        else:
            self._it = cycle(batches)
            for _ in range(self.taken):
                next(self._it)

    def __next__(self) -> Any:
        batch = next(self._it)
        self.taken += 1
        return batch

    def __iter__(self) -> "Stream":
        return self

    def position(self) -> dict[str, Any]:
        return {"taken": self.taken, "sampler": dict(self._source.position) if self._source is not None else None}
