"""Deployment graphs of decoder VLMs (LLaVA-style models, Idefics3 / SmolVLM): four graphs and a host loop.

- ``vision_encoder``: pixel_values [N, 3, S, S] → image_features [N, T, H], the vision tower and the projector,
  already in the language model's embedding width H (one row of T features per image).
- ``embed_tokens``: input_ids → inputs_embeds (the host writes the image features over the image-token rows,
  as the HF model's merge does).
- ``decoder_prefill``: inputs_embeds + attention_mask + position_ids → the last position's logits and every
  layer's key/values (``present_key_i`` / ``present_value_i``), batch and sequence dynamic.
- ``decoder_step``: one token's embeds + the mask over past and new token + its position + the past key/values
  (past length dynamic) → logits and the grown key/values.

The language model runs on transformers' ``DynamicCache`` built from the past tensors (one cache layer per
decoder layer, so a slim model whose layers keep different numbers of KV heads exports as it is). Only the last
position's logits leave the prefill: generation needs no more, and the vocabulary projection of every prompt
position would cost as much as a few layers. ``exporters.generate`` drives the graphs (greedy, the same tokens as
``generate(do_sample=False)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .graphs import ExportGraph, Fn, graphs_for, image_size


def _idefics3_features(m: Any, px: torch.Tensor) -> torch.Tensor:
    """Idefics3Model.get_image_features for whole images (the processor's tiles at the config's size). Every
    patch is real, so the position of patch k is k: the model's bucketed positions for a patch mask (which the
    TorchScript exporter types as float, an invalid ONNX Gather index) are not needed."""
    vm = m.model.vision_model
    emb = vm.embeddings
    patches = emb.patch_embedding(px).flatten(2).transpose(1, 2)
    hidden = patches + emb.position_embedding.weight[: patches.shape[1]]
    hidden = vm.post_layernorm(vm.encoder(inputs_embeds=hidden).last_hidden_state)
    return m.model.connector(hidden)


def _llava_features(m: Any, px: torch.Tensor) -> torch.Tensor:
    """LlavaModel.get_image_features without its per-image split into a list (which a trace unrolls per batch)."""
    cfg = m.config
    hidden = m.model.vision_tower(px, output_hidden_states=True).hidden_states
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
    crop = 1 if cfg.vision_feature_select_strategy == "default" else 0  # "default" drops the CLS token
    feats = torch.cat([hidden[i][:, crop:] for i in layers], dim=-1)
    return m.model.multi_modal_projector(feats)


@dataclass(frozen=True)
class _Parts:
    image_features: Any  # (model, pixel_values) -> [N, T, H]
    language_model: str  # attribute of model.model


_PARTS = {"Idefics3ForConditionalGeneration": _Parts(_idefics3_features, "text_model"),
          "LlavaForConditionalGeneration": _Parts(_llava_features, "language_model")}


def kv_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]


class DecoderGraphs:
    """The four graphs of one model, with example inputs at its sizes."""

    def __init__(self, model: nn.Module):
        self.model, self.parts = model, _PARTS[type(model).__name__]
        config: Any = model.config
        self.text: Any = config.text_config
        self.layers: int = self.text.num_hidden_layers
        self.size = image_size(config.vision_config)
        self.past, self.present = kv_names(self.layers, "past"), kv_names(self.layers, "present")

    def lm(self, m: Any) -> Any:
        return getattr(m.model, self.parts.language_model)

    def cache(self, past: tuple[torch.Tensor, ...]) -> Any:
        from transformers.cache_utils import DynamicCache

        data = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)] if past else None
        return DynamicCache(data, config=self.text)

    def decode(self, m: Any, emb: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
               *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The language model over ``emb`` after ``past``: the last position's logits and the grown cache."""
        out = self.lm(m)(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=self.cache(past),
                         use_cache=True)
        logits = m.lm_head(out.last_hidden_state[:, -1:])
        cache = out.cache
        return (logits, *[t for i in range(self.layers) for t in (cache.layers[i].keys, cache.layers[i].values)])

    # ---- example inputs ------------------------------------------------------------------------
    def pixels(self, b: int, s: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(b, 3, self.size, self.size)}

    def ids(self, b: int, s: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, self.text.vocab_size, (b, s))}

    def prompt(self, b: int, s: int) -> dict[str, torch.Tensor]:
        """A prompt batch with the mask and positions ``generate`` makes. The export traces at batch 2, left-padded
        (row 0 has two pad positions), so the graph holds the padded-mask path; the parity batches are unpadded,
        as a pad position's outputs (its key/values, which every later position masks out) are those of a query
        that attends to nothing, and an FP16 graph rounds them anywhere (padded generation is checked end to end)."""
        mask = torch.ones(b, s, dtype=torch.long)
        if b == 2 and s > 2:
            mask[0, :2] = 0
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return {"inputs_embeds": 0.5 * torch.randn(b, s, self.text.hidden_size), "attention_mask": mask,
                "position_ids": pos}

    def step_inputs(self, b: int, s: int) -> dict[str, torch.Tensor]:
        """One token after a prefill of ``s`` (run where the model is; the inputs come back on the CPU, as every
        graph's example inputs)."""
        first = self.prompt(b, s)
        where = next(self.model.parameters()).device
        with torch.no_grad():
            outs = [t.cpu() for t in self.decode(self.model, *(v.to(where) for v in first.values()))]
        mask = torch.cat([first["attention_mask"], torch.ones(b, 1, dtype=torch.long)], dim=1)
        return {"inputs_embeds": 0.5 * torch.randn(b, 1, self.text.hidden_size), "attention_mask": mask,
                "position_ids": first["position_ids"][:, -1:] + 1, **dict(zip(self.past, outs[1:]))}

    def graphs(self) -> list[ExportGraph]:
        feats = self.parts.image_features
        seq = {0: "batch", 1: "sequence"}
        prefill_axes = {"inputs_embeds": seq, "attention_mask": seq, "position_ids": seq, "logits": {0: "batch"},
                        **{n: {0: "batch", 2: "sequence"} for n in self.present}}
        step_axes = {"inputs_embeds": {0: "batch"}, "attention_mask": {0: "batch", 1: "total"},
                     "position_ids": {0: "batch"}, "logits": {0: "batch"},
                     **{n: {0: "batch", 2: "past"} for n in self.past},
                     **{n: {0: "batch", 2: "total"} for n in self.present}}
        return [
            ExportGraph("vision_encoder", Fn(self.model, feats), self.pixels, ["image_features"],
                        {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}}, stage="image encode"),
            ExportGraph("embed_tokens", Fn(self.model, lambda m, ids: self.lm(m).embed_tokens(ids)), self.ids,
                        ["inputs_embeds"], {"input_ids": seq, "inputs_embeds": seq}),
            ExportGraph("decoder_prefill", Fn(self.model, self.decode), self.prompt, ["logits", *self.present],
                        prefill_axes, stage="prefill"),
            ExportGraph("decoder_step", Fn(self.model, self.decode), self.step_inputs, ["logits", *self.present],
                        step_axes, stage="decode"),
        ]


@graphs_for(*_PARTS)
def decoder_vlm_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    return DecoderGraphs(model).graphs()
