"""Idefics3 (``Idefics3ForConditionalGeneration``, SmolVLM): a SigLIP-like vision tower, a connector (pixel
shuffle by ``scale_factor`` then one Linear) and a Llama language model.

Images come as ``(batch, images, 3, H, W)``; each image's ``(H/patch)² / scale_factor²`` features replace as many
image tokens in the text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionAttention, Idefics3VisionMLP

from .base import NORM_HALF, image_size_of, register
from .decoder_vlm import DecoderVLMAdapter, DecoderVLMModels, language_config


class Idefics3Models(DecoderVLMModels):
    family = "idefics3"
    default_vision = "idefics3"

    def image_processor(self, size: int) -> Any:
        """One image of ``size`` px per example (no splitting into tiles), normalised to [-1, 1]."""
        from transformers import Idefics3ImageProcessorPil

        edge = {"longest_edge": size}
        return Idefics3ImageProcessorPil(do_image_splitting=False, size=edge, max_image_size=edge, **NORM_HALF)

    def vlm_config(self, *, vision: str, text: str, hidden: int, layers: int, heads: int, image_size: int,
                   patch_size: int, vocab: int, token_ids: dict[str, int]) -> Any:
        from transformers import Idefics3Config

        if vision != "idefics3":
            raise ValueError(f"idefics3 has its own vision tower, not {vision!r}")
        ids = {k: v for k, v in token_ids.items() if k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        return Idefics3Config(
            vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
            text_config=language_config(text, hidden=hidden, layers=layers, heads=heads, vocab=vocab,
                                        intermediate=3 * hidden // 2, **ids),
            scale_factor=2, image_token_id=token_ids.get("image_token_id", vocab - 1))


@register
class Idefics3Adapter(DecoderVLMAdapter, Idefics3Models):
    family = "idefics3"
    model_types = ("idefics3",)
    aliases = {"smolvlm-256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
               "smolvlm-500m": "HuggingFaceTB/SmolVLM-500M-Instruct"}
    classes = {"Idefics3ForConditionalGeneration": "vqa"}
    towers = {"model.vision_model": "vision", "model.connector": "projector", "model.text_model": "language",
              "lm_head": "language"}
    vision_stack = "model.vision_model.encoder.layers"
    language_stack = "model.text_model.layers"
    feature_stacks = (vision_stack, language_stack)

    attention_types = (Idefics3VisionAttention,)
    mlp_types = (Idefics3VisionMLP,)

    def vision_tokens(self, model: nn.Module) -> int:
        cfg = model.config.vision_config
        return (image_size_of(cfg) // int(cfg.patch_size)) ** 2

    def lm_image_tokens(self, model: nn.Module) -> int:
        return self.vision_tokens(model) // int(model.config.scale_factor) ** 2

    def pixel_values(self, model: nn.Module, batch: int, gen: torch.Generator | None, dev: torch.device) -> torch.Tensor:
        return super().pixel_values(model, batch, gen, dev)[:, None]  # one image per example
