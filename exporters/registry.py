"""The registry of export backends: each backend module registers its format name here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_BACKENDS: dict[str, Callable[..., Any]] = {}


def register(fmt: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _BACKENDS[fmt] = fn
        return fn

    return deco
