"""The deployment graphs of a model, as its family registered them (``upop.adapters.graphs``).

The definitions live beside each family's adapter, so a new family adds its graphs in its own file;
the exporters only look them up.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from upop.adapters.graphs import ExportGraph, Fn, graph_classes, graphs_for, graphs_of

__all__ = ["ExportGraph", "Fn", "export_graphs", "graph_classes", "graphs_for"]


def export_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    """The graphs a deployment of ``model`` needs; ``adapter`` is its family's adapter."""
    fn = graphs_of(type(model).__name__)
    if fn is None:
        raise NotImplementedError(f"{adapter.family}: no export graphs")
    return fn(model, adapter)
