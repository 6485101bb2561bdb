"""The graphs a deployment of a model class needs (ONNX / TensorRT), registered by class name.

A graph is a small module around the model that computes one deployable step (an encoder, a
head, one decoding step), with a way to make example inputs and the axes left dynamic. Each
family registers its graphs beside its adapter (``@graphs_for("ItsModelClass")``); the exporters
(``upop.exporters``) look them up here. A graph may call the adapter's task hooks (``encode_image``,
``encode_text``, ``itm_logits``) so that an exported encoder computes exactly what evaluation computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ExportGraph", "Fn", "graph_classes", "graphs_for", "graphs_of"]

Inputs = Callable[[int, int], dict[str, torch.Tensor]]
Axes = dict[str, dict[int, str]]
GraphsFn = Callable[[nn.Module, Any], list["ExportGraph"]]

_GRAPHS: dict[str, GraphsFn] = {}


class ExportGraph:
    """One graph of a deployment: a module wrapper, how to make its inputs, and its dynamic axes.

    ``make_inputs(batch, seq)`` returns the named inputs (in the wrapper's argument order); axes
    named "batch" and "sequence" are dynamic in the exported graph. ``stage``: what the graph is in a deployment
    that decodes with a cache (image encode, prefill, decode), where one forward of the model is not what runs;
    the compress report times each staged graph before and after (``upop.latency.measure``).
    """

    def __init__(self, name: str, module: nn.Module, make_inputs: Inputs, outputs: list[str], dynamic: Axes,
                 stage: str | None = None):
        self.name, self.module, self.make_inputs = name, module, make_inputs
        self.outputs, self.dynamic, self.stage = outputs, dynamic, stage


class Fn(nn.Module):
    """Wraps a function of (model, *inputs) as a module, so a graph exports only what it needs."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(self.model, *args)


def graphs_for(*class_names: str) -> Callable[[GraphsFn], GraphsFn]:
    """Registers a function ``(model, adapter) -> graphs`` for the named model classes."""

    def add(fn: GraphsFn) -> GraphsFn:
        for name in class_names:
            _GRAPHS[name] = fn
        return fn

    return add


def graph_classes() -> list[str]:
    return sorted(_GRAPHS)


def graphs_of(class_name: str) -> GraphsFn | None:
    """The registered ``(model, adapter) -> graphs`` function of a model class, or None."""
    return _GRAPHS.get(class_name)


# ---- inputs and axes the families share ------------------------------------------------------
def pixels(size: int) -> Inputs:
    return lambda b, s: {"pixel_values": torch.randn(b, 3, size, size)}


def text(vocab_high: int, prefix: str = "") -> Callable[..., dict[str, torch.Tensor]]:
    def make(b: int, s: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}input_ids": torch.randint(1, vocab_high, (b, s)),
                f"{prefix}attention_mask": torch.ones(b, s, dtype=torch.long)}

    return make


def seq_axes(prefix: str = "") -> Axes:
    return {f"{prefix}input_ids": {0: "batch", 1: "sequence"}, f"{prefix}attention_mask": {0: "batch", 1: "sequence"}}


def image_size(vision_config: Any) -> int:
    size = vision_config.image_size
    return size if isinstance(size, int) else int(size[0])


def joined(*makers: Inputs) -> Inputs:
    return lambda b, s: {k: v for make in makers for k, v in make(b, s).items()}
