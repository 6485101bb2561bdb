"""Memory options of the training loops: activations recomputed in the backward (gradient checkpointing)."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

__all__ = ["enable_grad_checkpointing"]


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward (transformers' ``gradient_checkpointing_enable``).

    Non-reentrant checkpointing: the masks ζ live outside the model's parameters, and the reentrant variant
    gives no gradient to a layer whose inputs need none (the first layer under frozen embeddings).
    """
    if not getattr(model, "supports_gradient_checkpointing", False) or not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError(f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
