"""ViT image classification (transformers 5.x layout: q_proj/k_proj/v_proj/o_proj, mlp.fc1/fc2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import ViTConfig, ViTImageProcessorPil
from transformers.models.vit.modeling_vit import ViTAttention, ViTMLP

from .base import NORM_HALF, QKVOAdapter, image_size_of, rand_pixels, register
from .factories import ModelFactory
from .graphs import ExportGraph, Fn, graphs_for
from .graphs import image_size as _image_size, pixels as _pixels


class ViTModels(ModelFactory):
    """ViT configs and processor for models built here (test models have five classes)."""

    config_cls: Any = ViTConfig
    num_labels = 5

    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 99) -> Any:
        return self.config_cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=2 * hidden, image_size=image_size, patch_size=patch_size,
                               num_labels=self.num_labels)

    def image_processor(self, size: int) -> Any:
        return ViTImageProcessorPil(size={"height": size, "width": size}, **NORM_HALF)

    def small_config(self, class_name: str, *, hidden: int, layers: int, heads: int, image_size: int,
                     patch_size: int, vocab: int, token_ids: dict[str, int], num_labels: int = 2) -> Any:
        return self.config_cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=4 * hidden, image_size=image_size, patch_size=patch_size,
                               num_labels=num_labels)


@register
class ViTAdapter(QKVOAdapter, ViTModels):
    family = "vit"
    model_types = ("vit",)
    aliases = {"vit": "google/vit-base-patch16-224"}
    classes = {"ViTForImageClassification": "classification"}
    tasks = {"classification": "classification"}
    augment_policy = "deit-randaugment"
    towers = {"vit": "vision", "classifier": "head"}
    feature_stacks = ("vit.layers",)
    o_name = "o_proj"
    heads_attr = "num_attention_heads"

    attention_types = (ViTAttention,)
    mlp_types = (ViTMLP,)

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        dev = next(model.parameters()).device
        return {"pixel_values": rand_pixels(batch_size, image_size_of(model.config), generator, dev)}

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Labels from the batch position: deterministic, and enough to give every unit a gradient.
        labels = torch.arange(batch["pixel_values"].shape[0], device=batch["pixel_values"].device)
        return model(**batch, labels=labels % model.config.num_labels).loss

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(**batch).logits}

    def drop_path_branches(self, model: nn.Module) -> list[list[nn.Module]]:
        """Pre-norm blocks: the attention's and the MLP's outputs are added to the residual by the block."""
        return [[layer.attention, layer.mlp] for layer in model.get_submodule(self.feature_stacks[0])]


# ---- export graphs (``upop.exporters`` looks them up by class name) -------------------------------------
@graphs_for("ViTForImageClassification")
def classifier_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    return [ExportGraph("classifier", Fn(model, lambda m, px: m(pixel_values=px).logits),
                        _pixels(_image_size(model.config)), ["logits"],
                        {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})]
