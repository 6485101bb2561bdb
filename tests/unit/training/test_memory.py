"""Gradient checkpointing (``--grad-checkpointing``): activations recomputed in the backward, the same mask and
weight gradients, and one line for a model that cannot."""

import pytest
import torch

from upop.adapters import get_adapter
from upop.errors import ConfigError
from upop.pruning.masks import MaskSet
from upop.training.memory import enable_grad_checkpointing

from ...conftest import batches_for, build_tiny


def _grads(checkpointing: bool):
    adapter = get_adapter("llava")
    model = build_tiny("llava", "LlavaForConditionalGeneration", vision="siglip", text="qwen2").train()
    if checkpointing:
        enable_grad_checkpointing(model)
    calls = []
    model.model.language_model.layers[0].mlp.up_proj.register_forward_hook(lambda *_: calls.append(1))
    masks = MaskSet(model, adapter.modules(model), "dim")
    adapter.native_loss(model, batches_for(adapter, model, n=1)[0]).backward()
    grads = {s.name: z.grad.clone() for s, z in masks.items()}
    grads["lm_head"] = model.lm_head.weight.grad.clone()
    masks.remove()
    return grads, len(calls)


def test_checkpointing_recomputes_and_gives_the_same_gradients():
    plain, plain_calls = _grads(False)
    ckpt, ckpt_calls = _grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the layer ran again in the backward
    for name, g in plain.items():
        assert torch.allclose(ckpt[name], g, atol=1e-6, rtol=1e-5), name
    assert all(g.abs().sum() > 0 for g in plain.values())


def test_a_model_without_checkpointing_is_one_line():
    with pytest.raises(ConfigError, match="^--grad-checkpointing: Linear does not support gradient checkpointing$"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2))
