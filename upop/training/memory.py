"""Memory options of the training loops: activations recomputed in the backward (gradient checkpointing)."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

__all__ = ["enable_grad_checkpointing"]


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward (transformers' ``activation_checkpointing_enable``, named
    ``gradient_checkpointing_enable`` before transformers 5).

    Non-reentrant checkpointing: the masks ζ live outside the model's parameters, and the reentrant variant
    gives no gradient to a layer whose inputs need none (the first layer under frozen embeddings).
    """
    kwargs = {"use_reentrant": False}
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
