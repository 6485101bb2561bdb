"""SigLIP: CLIP's towers with a sigmoid loss. Only the config, classes and loss differ.

The vision pooling head's ``nn.MultiheadAttention`` is left out of the units (its fused
in-projection has no per-head size attribute to patch); the head's MLP is a SiglipMLP and
is compressible like the others.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import SiglipConfig, SiglipImageProcessorPil
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipMLP

from .base import NORM_HALF, register
from .clip import CLIPAdapter, CLIPModels, dual_encoder_graphs
from .graphs import graphs_for


class SiglipModels(CLIPModels):
    """CLIP's configs with SigLIP's config class and processor, and no projections."""

    config_cls: Any = SiglipConfig

    def image_processor(self, size: int) -> Any:
        return SiglipImageProcessorPil(size={"height": size, "width": size}, **NORM_HALF)

    def _joint_kwargs(self, hidden: int) -> dict[str, Any]:
        return {}  # no projections: the towers' pooled outputs are compared directly


@register
class SiglipAdapter(CLIPAdapter, SiglipModels):
    family = "siglip"
    paper_attn_weight = None  # the reference has no SigLIP run to weigh units as (--cost-weights paper)
    model_types = ("siglip",)
    aliases = {"siglip": "google/siglip-base-patch16-224"}
    classes = {"SiglipModel": "retrieval"}
    towers = {"vision_model": "vision", "text_model": "text"}

    attention_types = (SiglipAttention,)
    mlp_types = (SiglipMLP,)

    def preprocessor_options(self, model: nn.Module) -> dict[str, Any]:
        # SigLIP pools the last token, so it was trained on text padded to its full length.
        return {"pad_to_max_length": True, "max_length": int(model.config.text_config.max_position_embeddings)}

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, nn.functional.normalize(model.vision_model(pixel_values=pixel_values).pooler_output, dim=-1)

    def encode_text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return nn.functional.normalize(pooled, dim=-1)

    def pair_logits(self, model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Cosine × exp(learnable logit_scale) + learnable logit_bias."""
        return rows @ cols.t() * model.logit_scale.exp() + model.logit_bias

    def pair_loss(self, i2t: torch.Tensor, t2i: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """SigLIP's sigmoid loss over every pair (each text row against every image column, summed), the mean
        over the texts; row i's positive is column ``targets[i]``."""
        sign = -torch.ones_like(t2i)
        sign[torch.arange(len(t2i), device=t2i.device), targets] = 1.0
        return -nn.functional.logsigmoid(sign * t2i).sum(1).mean()


graphs_for("SiglipModel")(dual_encoder_graphs)  # the same graphs as clip's
