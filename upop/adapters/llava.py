"""LLaVA (``LlavaForConditionalGeneration``): a CLIP or SigLIP vision tower, a two-layer projector, and a Llama,
Qwen2 or Mistral language model reading the projected patch features in place of its image tokens.

LLaVA reads the vision tower's hidden states at ``vision_feature_layer`` (-2 in LLaVA-1.5): the layers after it do
not reach the LM, so they are not units (no gradient reaches their masks; their weights stay as they are).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipMLP

from .base import NORM_HALF, image_size_of, register
from .decoder_vlm import DecoderVLMAdapter, DecoderVLMModels, language_config

#: vision tower name -> (its config's model_type, LLaVA's feature selection: CLIP drops its class token)
VISION_TOWERS = {"clip": ("clip_vision_model", "default"), "siglip": ("siglip_vision_model", "full")}


class LlavaModels(DecoderVLMModels):
    family = "llava"
    default_vision = "clip"

    def image_processor(self, size: int) -> Any:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     **NORM_HALF)

    def vlm_config(self, *, vision: str, text: str, hidden: int, layers: int, heads: int, image_size: int,
                   patch_size: int, vocab: int, token_ids: dict[str, int]) -> Any:
        from transformers import LlavaConfig

        if vision not in VISION_TOWERS:
            raise ValueError(f"llava vision tower {vision!r}: one of {', '.join(VISION_TOWERS)}")
        model_type, select = VISION_TOWERS[vision]
        extra = {"vision_use_head": False} if vision == "siglip" else {}
        ids = {k: v for k, v in token_ids.items() if k in ("pad_token_id", "bos_token_id", "eos_token_id")}
        return LlavaConfig(
            vision_config=dict(model_type=model_type, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
                               patch_size=patch_size, **extra),
            text_config=language_config(text, hidden=hidden, layers=layers, heads=heads, vocab=vocab,
                                        intermediate=3 * hidden // 2, **ids),
            image_token_index=token_ids.get("image_token_id", vocab - 1), vision_feature_select_strategy=select,
            projector_hidden_act="gelu", image_seq_length=self._lm_tokens(image_size, patch_size, vision, select))

    @staticmethod
    def _lm_tokens(image_size: int, patch_size: int, vision: str, select: str) -> int:
        tokens = (image_size // patch_size) ** 2 + (1 if vision == "clip" else 0)
        return tokens - (1 if select == "default" else 0)


@register
class LlavaAdapter(DecoderVLMAdapter, LlavaModels):
    family = "llava"
    model_types = ("llava",)
    aliases = {"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf"}
    classes = {"LlavaForConditionalGeneration": "vqa"}
    towers = {"model.vision_tower": "vision", "model.multi_modal_projector": "projector",
              "model.language_model": "language", "lm_head": "language"}
    vision_stack = "model.vision_tower.encoder.layers"
    language_stack = "model.language_model.layers"
    feature_stacks = (vision_stack, language_stack)

    attention_types = (CLIPAttention, SiglipAttention)
    mlp_types = (CLIPMLP, SiglipMLP)

    def vision_layers_used(self, model: nn.Module) -> int:
        """How many of the vision tower's first layers reach the LM (hidden state k is layer k-1's output)."""
        n = len(model.get_submodule(self.vision_stack))
        chosen = model.config.vision_feature_layer
        return max(int(k) % (n + 1) for k in (chosen if isinstance(chosen, (list, tuple)) else [chosen]))

    def vision_tokens(self, model: nn.Module) -> int:
        cfg = model.config.vision_config
        cls_token = 1 if hasattr(model.get_submodule("model.vision_tower.embeddings"), "class_embedding") else 0
        return (image_size_of(cfg) // int(cfg.patch_size)) ** 2 + cls_token

    def lm_image_tokens(self, model: nn.Module) -> int:
        drop = 1 if model.config.vision_feature_select_strategy == "default" else 0
        return self.vision_tokens(model) - drop
