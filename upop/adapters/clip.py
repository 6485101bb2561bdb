"""CLIP: a vision tower and a text tower, each a stack of CLIPAttention + CLIPMLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from .base import NORM_HALF, QKVOAdapter, image_size_of, rand_ids, rand_pixels, register
from .factories import ModelFactory
from .graphs import ExportGraph, Fn, graphs_for
from .graphs import image_size as _image_size, joined as _joined, pixels as _pixels, seq_axes as _seq_axes, text as _text


class CLIPModels(ModelFactory):
    """CLIP configs and processor for models built here: two towers of one size, projected to it."""

    config_cls: Any = CLIPConfig

    def image_processor(self, size: int) -> Any:
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     **NORM_HALF)

    def small_config(self, class_name: str, *, hidden: int, layers: int, heads: int, image_size: int,
                     patch_size: int, vocab: int, token_ids: dict[str, int], num_labels: int = 2) -> Any:
        tower = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden)
        ids = {k: v for k, v in token_ids.items() if k != "sep_token_id"}
        return self.config_cls(text_config=dict(tower, vocab_size=vocab, max_position_embeddings=64, **ids),
                               vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
                               **self._joint_kwargs(hidden))

    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 99) -> Any:
        tower = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden)
        return self.config_cls(
            text_config=dict(tower, vocab_size=vocab, max_position_embeddings=64, pad_token_id=0,
                             bos_token_id=vocab - 2, eos_token_id=vocab - 1),
            vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
            **self._joint_kwargs(hidden),
        )

    def _joint_kwargs(self, hidden: int) -> dict[str, Any]:
        """Config keys outside the two towers (CLIP projects both to a shared width)."""
        return {"projection_dim": hidden}


@register
class CLIPAdapter(QKVOAdapter, CLIPModels):
    family = "clip"
    paper_attn_weight = 36.0  # the UPop paper's attention:MLP weighting for CLIP (--cost-weights paper)
    model_types = ("clip",)
    aliases = {"clip": "openai/clip-vit-base-patch16"}
    classes = {"CLIPModel": "retrieval"}
    tasks = {"retrieval": "dual-retrieval", "classification": "zero-shot"}
    augment_policy = "blip-randaugment"  # what the UPop paper trains CLIP retrieval with (BLIP's transform)
    towers = {"vision_model": "vision", "text_model": "text", "visual_projection": "vision",
              "text_projection": "text"}
    feature_stacks = ("vision_model.encoder.layers", "text_model.encoder.layers")

    attention_types = (CLIPAttention,)
    mlp_types = (CLIPMLP,)

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        pooled = model.vision_model(pixel_values=pixel_values).pooler_output
        return None, nn.functional.normalize(model.visual_projection(pooled), dim=-1)

    def encode_text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return nn.functional.normalize(model.text_projection(pooled), dim=-1)

    def pair_logits(self, model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The model's image-text logits of normalised features: cosine × exp(learnable logit_scale)."""
        return rows @ cols.t() * model.logit_scale.exp()

    def pair_loss(self, i2t: torch.Tensor, t2i: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric cross-entropy; row i's positive is column ``targets[i]`` (columns: every rank's)."""
        return (nn.functional.cross_entropy(i2t, targets) + nn.functional.cross_entropy(t2i, targets)) / 2

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        dev = next(model.parameters()).device
        cfg = model.config
        return {
            "input_ids": rand_ids(batch_size, seq_len, cfg.text_config.vocab_size, generator, dev),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=dev),
            "pixel_values": rand_pixels(batch_size, image_size_of(cfg.vision_config), generator, dev),
        }

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch, return_loss=True).loss

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(**batch)
        return {"logits_per_image": out.logits_per_image, "image_embeds": out.image_embeds,
                "text_embeds": out.text_embeds}


# ---- export graphs (``upop.exporters`` looks them up by class name) -------------------------------------
@graphs_for("CLIPModel")
def dual_encoder_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    pixels = _pixels(_image_size(model.config.vision_config))
    text = _text(model.config.text_config.vocab_size)

    def joint(m: nn.Module, px: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        return m(pixel_values=px, input_ids=ids, attention_mask=am).logits_per_image

    return [
        ExportGraph("image_encoder", Fn(model, lambda m, px: adapter.encode_image(m, px)[1]), pixels,
                    ["image_embeds"], {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}),
        ExportGraph("text_encoder", Fn(model, lambda m, ids, am: adapter.encode_text(m, ids, am)), text,
                    ["text_embeds"], {**_seq_axes(), "text_embeds": {0: "batch"}}),
        ExportGraph("joint", Fn(model, joint), _joined(pixels, text), ["logits_per_image"],
                    {"pixel_values": {0: "images"}, "input_ids": {0: "texts", 1: "sequence"},
                     "attention_mask": {0: "texts", 1: "sequence"}, "logits_per_image": {0: "images", 1: "texts"}}),
    ]
