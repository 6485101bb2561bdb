"""BLIP visual reasoning (NLVR2): ``upop.models.BlipNlvrForVisualReasoning``.

Every attention — vision, text self-attention, and each of the two cross-attention branches —
and every MLP is a compressible module in the one unified ranking; slimming reuses the BLIP
adapter's patching (the branches are ``transformers`` BLIP text attentions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.blip_nlvr import (
    BlipNlvrConfig,
    BlipNlvrForVisualReasoning,
    BlipNlvrTextLayer,
    BlipNlvrTwinCrossAttention,
)
from ..pruning.units import ModuleSpec
from .base import image_size_of, rand_ids, rand_pixels, register
from .blip import BlipAdapter, BlipModels
from .graphs import ExportGraph, Fn, graphs_for
from .graphs import image_size as _image_size, text as _text


class BlipNlvrModels(BlipModels):
    """BLIP retrieval configs turned into reasoning configs."""

    def small_config(self, class_name: str, *, hidden: int, layers: int, heads: int, image_size: int,
                     patch_size: int, vocab: int, token_ids: dict[str, int], num_labels: int = 2) -> Any:
        base = super().small_config("BlipForImageTextRetrieval", hidden=hidden, layers=layers, heads=heads,
                                    image_size=image_size, patch_size=patch_size, vocab=vocab, token_ids=token_ids)
        return self._as_nlvr(base)

    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 99) -> Any:
        # A wider vision tower (k/v input width differs from q's), and two layers: one that averages
        # the branches and one that merges them.
        base = super().random_config("BlipForImageTextRetrieval", hidden=hidden, layers=layers, heads=heads,
                                     image_size=image_size, patch_size=patch_size, vocab=vocab)
        return self._as_nlvr(base)

    @staticmethod
    def _as_nlvr(base: Any) -> BlipNlvrConfig:
        data = base.to_dict()
        for k in ("model_type", "architectures", "transformers_version"):
            data.pop(k, None)
        data["text_config"]["encoder_hidden_size"] = base.vision_config.hidden_size
        return BlipNlvrConfig(**data)


@register
class BlipNlvrAdapter(BlipAdapter, BlipNlvrModels):
    family = "blip_nlvr"
    model_types = ("blip_nlvr",)
    aliases: dict[str, str] = {}
    classes = {"BlipNlvrForVisualReasoning": "nlvr"}
    tasks = {"nlvr": "blip-nlvr"}
    towers = {"vision_model": "vision", "text_encoder": "text", "cls_head": "text"}
    feature_stacks = ("vision_model.encoder.layers", "text_encoder.encoder.layer")

    def _resolve_class(self, name: str) -> type[nn.Module]:
        return BlipNlvrForVisualReasoning

    def specs_of(self, path: str, mod: nn.Module) -> list[ModuleSpec]:
        if isinstance(mod, BlipNlvrTwinCrossAttention):
            return [self.text_attention_spec(f"{path}.self{b}", getattr(mod, f"self{b}"),
                                             f"{path}.output.dense{b}", "cross") for b in (0, 1)]
        if isinstance(mod, BlipNlvrTextLayer):
            return [self.text_ffn_spec(path, mod)]
        return super().specs_of(path, mod)

    def module_items(self, model: nn.Module, spec: ModuleSpec) -> int:
        # Both images go through the vision tower: two sequences per example (not one of twice the tokens,
        # which would double the quadratic attention term as well).
        return 2 if spec.tower == "vision" else 1

    def init_from(self, source: nn.Module) -> nn.Module:
        """A reasoning model initialised from an HF BLIP retrieval model; its text reads BLIP's [ENC] first where the
        retrieval model's embedding holds that row (transformers' converted checkpoints: 30,523), as its ITM
        encoder, whose layers it starts from, was trained."""
        from ..models.enc_token import enc_row, text_embedding

        return BlipNlvrForVisualReasoning.from_retrieval(source, enc_token_id=enc_row(*text_embedding(source)))

    # ---- synthetic inputs ----------------------------------------------------------------------------
    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        dev = next(model.parameters()).device
        cfg = model.config
        size = image_size_of(cfg.vision_config)
        ids = rand_ids(batch_size, seq_len, cfg.text_config.vocab_size - 2, generator, dev)
        px = rand_pixels(2 * batch_size, size, generator, dev).view(batch_size, 2, 3, size, size)
        return {"pixel_values": px, "input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = batch["input_ids"].shape[0]
        labels = torch.arange(b, device=batch["input_ids"].device) % 2
        return model(**batch, labels=labels).loss

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(**batch).logits}


# ---- export graphs (``upop.exporters`` looks them up by class name) -------------------------------------
@graphs_for("BlipNlvrForVisualReasoning")
def blip_nlvr_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    size = _image_size(model.config.vision_config)
    text = _text(model.config.text_config.vocab_size - 2)

    def inputs(b: int, s: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(b, 2, 3, size, size), **text(b, s)}

    def run(m: nn.Module, px: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        return m(pixel_values=px, input_ids=ids, attention_mask=am).logits

    return [ExportGraph("reasoning", Fn(model, run), inputs, ["logits"],
                        {"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "sequence"},
                         "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}})]
