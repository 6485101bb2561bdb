"""DeiT image classification: ViT's layout with its own classes (and a distillation token)."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import DeiTConfig
from transformers.models.deit.modeling_deit import DeiTAttention, DeiTMLP

from .base import register
from .graphs import graphs_for
from .vit import ViTAdapter, ViTModels, classifier_graphs


class DeiTModels(ViTModels):
    """ViT's configs, with DeiT's config class."""

    config_cls: Any = DeiTConfig


@register
class DeiTAdapter(ViTAdapter, DeiTModels):
    family = "deit"
    # --cost-weights paper: the reference's DeiT code computes DeiT-S's true ratio 9234/769 but stores it in an int64
    # tensor, so the weight its mask update really uses is 12
    paper_attn_weight = 12.0
    model_types = ("deit",)
    aliases = {"deit": "facebook/deit-small-patch16-224"}
    feature_stacks = ("deit.layers",)
    # The distilled "WithTeacher" class is inference-only (no loss), so it cannot be retrained here.
    classes = {"DeiTForImageClassification": "classification"}
    towers = {"deit": "vision", "classifier": "head", "distillation_classifier": "head"}

    def image_tokens(self, model: nn.Module) -> int:
        return super().image_tokens(model) + 1  # the distillation token

    attention_types = (DeiTAttention,)
    mlp_types = (DeiTMLP,)


graphs_for("DeiTForImageClassification")(classifier_graphs)  # the same graphs as vit's
