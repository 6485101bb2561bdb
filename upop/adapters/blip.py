"""BLIP: vision encoder, text encoder (with cross-attention to the image) and text decoder.

Two BLIP specifics (pitfalls of its modules):
- The vision attention reshapes with ``embed_dim // num_heads`` taken from its input width,
  so no attribute makes it smaller: slimmed modules become ``SlimBlipAttention``, a subclass
  whose forward reads ``num_heads``/``head_dim`` (isinstance checks keep working).
- The text attention divides by ``sqrt(attention_head_size)`` with no scale attribute. When
  slimming changes that size, the factor sqrt(new/old) is folded into the query rows, so the
  scores keep the original 1/sqrt(head_dim) scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import BlipConfig, BlipImageProcessorPil
from transformers.models.blip.modeling_blip import BlipAttention, BlipMLP
from transformers.models.blip.modeling_blip_text import BlipTextAttention, BlipTextLayer

from ..units import AttentionSpec, InProj, MLPSpec, ModuleSpec
from .base import NORM_HALF, Adapter, ExportGraph, Fn, image_size_of, rand_ids, rand_pixels, register


class SlimBlipAttention(BlipAttention):
    """BlipAttention whose heads may be narrower than ``hidden_size // num_heads``."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, tgt_len, _ = hidden_states.size()
        mixed_qkv = (
            self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        query, key, value = mixed_qkv[0], mixed_qkv[1], mixed_qkv[2]
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = torch.matmul(probs, value).permute(0, 2, 1, 3)
        context = context.reshape(bsz, tgt_len, self.num_heads * self.head_dim)
        return self.projection(context), probs


@register
class BlipAdapter(Adapter):
    family = "blip"
    model_types = ("blip",)
    classes = {
        "BlipForImageTextRetrieval": "retrieval",
        "BlipForConditionalGeneration": "caption",
        "BlipForQuestionAnswering": "vqa",
    }
    tasks = {"retrieval": "blip-retrieval", "caption": "blip-caption", "vqa": "blip-vqa"}
    towers = {"vision_model": "vision", "text_encoder": "text", "text_decoder": "decoder",
              "vision_proj": "vision", "text_proj": "text", "itm_head": "text"}

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        return [spec for path, mod in model.named_modules() for spec in self.specs_of(path, mod)]

    def specs_of(self, path: str, mod: nn.Module) -> list[ModuleSpec]:
        """The compressible modules that ``mod`` (at ``path``) is, if any."""
        if isinstance(mod, BlipAttention):
            return [AttentionSpec(
                name=path, tower=self.tower_of(path), role="self", in_projs=(InProj(f"{path}.qkv", 3),),
                out_proj=f"{path}.projection", num_heads=int(mod.num_heads), head_dim=int(mod.head_dim))]
        if isinstance(mod, BlipMLP):
            return [MLPSpec(name=path, tower=self.tower_of(path), fc1=f"{path}.fc1", fc2=f"{path}.fc2",
                            width=int(mod.fc1.out_features))]
        if isinstance(mod, BlipTextAttention):
            return [self.text_attention_spec(f"{path}.self", mod.self, f"{path}.output.dense",
                                             "cross" if path.endswith("crossattention") else "self")]
        if isinstance(mod, BlipTextLayer):
            return [self.text_ffn_spec(path, mod)]
        return []

    def text_attention_spec(self, name: str, inner: nn.Module, out_proj: str, role: str) -> AttentionSpec:
        """A BLIP text attention (``BlipTextSelfAttention`` at ``name``) and its output projection."""
        return AttentionSpec(
            name=name, tower=self.tower_of(name), role=role,
            in_projs=tuple(InProj(f"{name}.{n}") for n in ("query", "key", "value")),
            out_proj=out_proj, num_heads=int(inner.num_attention_heads), head_dim=int(inner.attention_head_size))

    def text_ffn_spec(self, path: str, layer: nn.Module) -> MLPSpec:
        return MLPSpec(name=f"{path}.ffn", tower=self.tower_of(path), fc1=f"{path}.intermediate.dense",
                       fc2=f"{path}.output.dense", width=int(layer.intermediate.dense.out_features))

    def patch_attention(self, model: nn.Module, spec: AttentionSpec, num_heads: int, head_dim: int) -> None:
        mod = model.get_submodule(spec.name)
        if isinstance(mod, BlipAttention):
            mod.num_heads = num_heads
            mod.head_dim = head_dim
            mod.__class__ = SlimBlipAttention
            return
        old = mod.attention_head_size
        if head_dim != old:
            factor = math.sqrt(head_dim / old)
            with torch.no_grad():
                mod.query.weight.mul_(factor)
                if mod.query.bias is not None:
                    mod.query.bias.mul_(factor)
        mod.num_attention_heads = num_heads
        mod.attention_head_size = head_dim
        mod.all_head_size = num_heads * head_dim

    def module_tokens(self, model: nn.Module, spec: ModuleSpec, text_tokens: int) -> tuple[int, int]:
        if spec.role == "cross" and spec.tower == "decoder" and type(model).__name__ == "BlipForQuestionAnswering":
            return text_tokens, text_tokens  # VQA's answer decoder attends to the question, not the image
        return super().module_tokens(model, spec, text_tokens)

    # ---- task hooks --------------------------------------------------------------------------
    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        seq = model.vision_model(pixel_values=pixel_values).last_hidden_state
        return seq, nn.functional.normalize(model.vision_proj(seq[:, 0]), dim=-1)

    def encode_text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Without encoder_hidden_states the BLIP text layers skip cross-attention: the unimodal encoder.
        h = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(model.text_proj(h[:, 0]), dim=-1)

    def itm_logits(self, model: nn.Module, image_seq: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        att = torch.ones(image_seq.shape[:-1], dtype=torch.long, device=image_seq.device)
        h = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_seq,
                               encoder_attention_mask=att).last_hidden_state
        return model.itm_head(h[:, 0])

    # ---- export --------------------------------------------------------------------------------
    def export_graphs(self, model: nn.Module) -> list[ExportGraph]:
        cfg = model.config
        size = image_size_of(cfg.vision_config)
        vocab = cfg.text_config.vocab_size
        tokens = (size // cfg.vision_config.patch_size) ** 2 + 1
        width = cfg.vision_config.hidden_size
        name = type(model).__name__

        def pixels(b: int, s: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": torch.randn(b, 3, size, size)}

        def text(b: int, s: int, prefix: str = "") -> dict[str, torch.Tensor]:
            return {f"{prefix}input_ids": torch.randint(1, vocab - 2, (b, s)),
                    f"{prefix}attention_mask": torch.ones(b, s, dtype=torch.long)}

        def seq_dyn(prefix: str = "") -> dict[str, dict[int, str]]:
            return {f"{prefix}input_ids": {0: "batch", 1: "sequence"}, f"{prefix}attention_mask": {0: "batch", 1: "sequence"}}

        def image_seq(m: nn.Module, px: torch.Tensor) -> torch.Tensor:
            return m.vision_model(pixel_values=px).last_hidden_state

        vision = ExportGraph("vision_encoder", Fn(model, image_seq), pixels, ["image_embeds"],
                             {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
        embeds = lambda b, s: {"image_embeds": 0.5 * torch.randn(b, tokens, width)}  # noqa: E731
        if name == "BlipForImageTextRetrieval":
            return [
                ExportGraph("image_encoder", Fn(model, lambda m, px: self.encode_image(m, px)), pixels,
                            ["image_embeds", "image_feat"],
                            {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}, "image_feat": {0: "batch"}}),
                ExportGraph("text_encoder", Fn(model, lambda m, ids, am: self.encode_text(m, ids, am)), text,
                            ["text_feat"], {**seq_dyn(), "text_feat": {0: "batch"}}),
                ExportGraph("itm", Fn(model, lambda m, emb, ids, am: self.itm_logits(m, emb, ids, am)),
                            lambda b, s: {**embeds(b, s), **text(b, s)}, ["itm_logits"],
                            {"image_embeds": {0: "batch"}, **seq_dyn(), "itm_logits": {0: "batch"}}),
            ]
        if name == "BlipForConditionalGeneration":
            return [vision, *self._decoder_graphs(model, embeds, text)]

        def question(m: nn.Module, emb: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
            att = torch.ones(emb.shape[:-1], dtype=torch.long, device=emb.device)
            return m.text_encoder(input_ids=ids, attention_mask=am, encoder_hidden_states=emb,
                                  encoder_attention_mask=att).last_hidden_state

        def answer(m: nn.Module, q: torch.Tensor, qm: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
            return m.text_decoder(input_ids=ids, attention_mask=am, encoder_hidden_states=q,
                                  encoder_attention_mask=qm, use_cache=False).logits

        qwidth = cfg.text_config.hidden_size
        return [
            vision,
            ExportGraph("question_encoder", Fn(model, question), lambda b, s: {**embeds(b, s), **text(b, s)},
                        ["question_embeds"], {"image_embeds": {0: "batch"}, **seq_dyn(),
                                              "question_embeds": {0: "batch", 1: "sequence"}}),
            ExportGraph("answer_decoder", Fn(model, answer),
                        lambda b, s: {"question_embeds": 0.5 * torch.randn(b, s, qwidth),
                                      "question_mask": torch.ones(b, s, dtype=torch.long),
                                      **text(b, max(1, s // 2), "decoder_")},
                        ["logits"], {"question_embeds": {0: "batch", 1: "sequence"},
                                     "question_mask": {0: "batch", 1: "sequence"},
                                     "decoder_input_ids": {0: "batch", 1: "answer"},
                                     "decoder_attention_mask": {0: "batch", 1: "answer"},
                                     "logits": {0: "batch", 1: "answer"}}),
        ]

    def image_processor(self, size: int) -> Any:
        return BlipImageProcessorPil(size={"height": size, "width": size}, **NORM_HALF)

    def small_config(self, class_name: str, *, hidden: int, layers: int, heads: int, image_size: int,
                     patch_size: int, vocab: int, token_ids: dict[str, int], num_labels: int = 2) -> Any:
        tower = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden)
        return BlipConfig(
            text_config=dict(tower, vocab_size=vocab, max_position_embeddings=64, **token_ids),
            # BLIP's vision init std defaults to 1e-10 (it expects pretrained weights): from scratch
            # that leaves the position embeddings silent for hundreds of steps.
            vision_config=dict(tower, image_size=image_size, patch_size=patch_size, initializer_range=0.02),
            image_text_hidden_size=hidden)

    def _decoder_graphs(self, model: nn.Module, embeds: Any, text: Any) -> list[ExportGraph]:
        """Captioning decoder as two graphs with a per-layer KV cache (its shapes differ per layer
        after slimming): ``decoder_prefill`` over the prompt, then ``decoder_step`` for one token."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        n_layers = model.config.text_config.num_hidden_layers
        past_self = [f"past_self_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        present_self = [f"present_self_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        cross = [f"cross_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]

        def flat(cache: Any, which: str) -> list[torch.Tensor]:
            c = cache.self_attention_cache if which == "self" else cache.cross_attention_cache
            return [t for i in range(n_layers) for t in (c.layers[i].keys, c.layers[i].values)]

        def prefill(m: nn.Module, emb: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            out = m.text_decoder(input_ids=ids, attention_mask=am, encoder_hidden_states=emb, cache=cache,
                                 use_cache=True)
            return (out.logits, *flat(out.cache, "self"), *flat(out.cache, "cross"))

        def step(m: nn.Module, emb: torch.Tensor, ids: torch.Tensor, am: torch.Tensor,
                 *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            data = [(past[2 * i], past[2 * i + 1], past[2 * n_layers + 2 * i], past[2 * n_layers + 2 * i + 1])
                    for i in range(n_layers)]
            out = m.text_decoder(input_ids=ids, attention_mask=am, encoder_hidden_states=emb,
                                 cache=EncoderDecoderCache(data), use_cache=True)
            return (out.logits, *flat(out.cache, "self"))

        def step_inputs(b: int, s: int) -> dict[str, torch.Tensor]:
            prompt = {**embeds(b, s), **text(b, s)}
            with torch.no_grad():
                outs = prefill(model, prompt["image_embeds"], prompt["input_ids"], prompt["attention_mask"])
            kv = dict(zip(past_self + [f"past_{n}" for n in cross], outs[1:]))
            return {"image_embeds": prompt["image_embeds"], "input_ids": torch.randint(1, 90, (b, 1)),
                    "attention_mask": torch.ones(b, s + 1, dtype=torch.long), **kv}

        kv_axes = {n: {0: "batch", 2: "past"} for n in past_self}
        return [
            ExportGraph("decoder_prefill", Fn(model, prefill), lambda b, s: {**embeds(b, s), **text(b, s)},
                        ["logits", *present_self, *cross],
                        {"image_embeds": {0: "batch"}, "input_ids": {0: "batch", 1: "sequence"},
                         "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
                         **{n: {0: "batch", 2: "sequence"} for n in present_self}, **{n: {0: "batch"} for n in cross}}),
            ExportGraph("decoder_step", Fn(model, step), step_inputs, ["logits", *present_self],
                        {"image_embeds": {0: "batch"}, "input_ids": {0: "batch"},
                         "attention_mask": {0: "batch", 1: "total"}, **kv_axes,
                         **{f"past_{n}": {0: "batch"} for n in cross}, "logits": {0: "batch"},
                         **{n: {0: "batch", 2: "total"} for n in present_self}}),
        ]

    # ---- synthetic inputs -----------------------------------------------------------------
    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 99) -> Any:
        # Retrieval and captioning get a wider vision tower so cross-attention k/v have a
        # different input width than q; VQA's decoder attends to the text encoder, so both match.
        vision_hidden = hidden if class_name == "BlipForQuestionAnswering" else hidden + hidden // 2
        return BlipConfig(
            text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=64,
                             bos_token_id=vocab - 2, sep_token_id=vocab - 1, pad_token_id=0),
            vision_config=dict(hidden_size=vision_hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=2 * vision_hidden, image_size=image_size, patch_size=patch_size),
            image_text_hidden_size=hidden,
        )

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        dev = next(model.parameters()).device
        cfg = model.config
        vocab = cfg.text_config.vocab_size
        ids = rand_ids(batch_size, seq_len, vocab - 2, generator, dev)
        batch = {
            "pixel_values": rand_pixels(batch_size, image_size_of(cfg.vision_config), generator, dev),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
        }
        if type(model).__name__ == "BlipForQuestionAnswering":
            batch["labels"] = rand_ids(batch_size, max(2, seq_len // 2), vocab - 2, generator, dev)
        return batch

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        name = type(model).__name__
        if name == "BlipForImageTextRetrieval":
            # ITM on matched pairs and on pairs with the images rolled by one (negatives).
            b = batch["pixel_values"].shape[0]
            pos = model(**batch).itm_score
            neg = model(pixel_values=batch["pixel_values"].roll(1, 0), input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).itm_score
            logits = torch.cat([pos, neg])
            labels = torch.cat([torch.ones(b), torch.zeros(b)]).long().to(logits.device)
            itc = model(**batch, use_itm_head=False).itm_score
            return nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(
                itc / 0.07, torch.arange(b, device=itc.device))
        if name == "BlipForConditionalGeneration":
            return model(**batch, labels=batch["input_ids"]).loss
        return model(**batch).loss

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = type(model).__name__
        if name == "BlipForImageTextRetrieval":
            return {"itm_score": model(**batch).itm_score, "itc_score": model(**batch, use_itm_head=False).itm_score}
        if name == "BlipForConditionalGeneration":
            return {"logits": model(**batch).logits}
        out = model(**batch)
        return {"loss": out.loss.reshape(1), "image_embeds": out.image_embeds}
