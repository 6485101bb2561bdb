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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import BlipConfig, BlipImageProcessorPil
from transformers.models.blip.modeling_blip import BlipAttention, BlipMLP
from transformers.models.blip.modeling_blip_text import BlipTextAttention, BlipTextLayer

from ..pruning.units import AttentionSpec, InProj, MLPSpec, ModuleSpec
from .base import NORM_HALF, Adapter, image_size_of, rand_ids, rand_pixels, register
from .factories import ModelFactory
from .graphs import ExportGraph, Fn, graphs_for
from .graphs import image_size as _image_size, pixels as _pixels, seq_axes as _seq_axes, text as _text


#: BLIP's learnable ITC temperature (the reference's ``temp``: 0.07 at the start, clamped to [0.001, 0.5] before
#: every training step). The transformers retrieval model has none: upop adds it to the retrieval models it builds
#: and trains, as a parameter (the optimizer steps it, the slim checkpoint's weights hold it).
ITC_TEMP, ITC_TEMP_INIT, ITC_TEMP_RANGE = "itc_temp", 0.07, (0.001, 0.5)


def add_itc_temperature(model: nn.Module, value: float = ITC_TEMP_INIT) -> nn.Parameter:
    """``model``'s ITC temperature parameter, added (at ``value``) where it has none. Weights without it (the
    transformers checkpoints, slim checkpoints of an earlier upop) load with the fixed 0.07 they were trained at."""
    if ITC_TEMP not in model._parameters:
        dev = next(model.parameters()).device
        model.register_parameter(ITC_TEMP, nn.Parameter(torch.tensor(float(value), device=dev)))
        model._register_load_state_dict_pre_hook(_default_temperature)
    return model._parameters[ITC_TEMP]  # type: ignore[return-value]


def _default_temperature(state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    state_dict.setdefault(prefix + ITC_TEMP, torch.tensor(ITC_TEMP_INIT))


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


Batch = dict[str, torch.Tensor]


def _itm_itc_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """ITM on matched pairs and on pairs with the images rolled by one (negatives), plus ITC."""
    b = batch["pixel_values"].shape[0]
    pos = model(**batch).itm_score
    neg = model(pixel_values=batch["pixel_values"].roll(1, 0), input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"]).itm_score
    logits = torch.cat([pos, neg])
    labels = torch.cat([torch.ones(b), torch.zeros(b)]).long().to(logits.device)
    itc = model(**batch, use_itm_head=False).itm_score
    return nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(
        itc / 0.07, torch.arange(b, device=itc.device))


def _caption_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def _own_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


def _retrieval_outputs(model: nn.Module, batch: Batch) -> Batch:
    return {"itm_score": model(**batch).itm_score, "itc_score": model(**batch, use_itm_head=False).itm_score}


def _caption_outputs(model: nn.Module, batch: Batch) -> Batch:
    return {"logits": model(**batch).logits}


def _answer_outputs(model: nn.Module, batch: Batch) -> Batch:
    out = model(**batch)
    return {"loss": out.loss.reshape(1), "image_embeds": out.image_embeds}


@dataclass(frozen=True)
class BlipClass:
    """What one BLIP model class does differently from the others, declared in one place."""

    task: str
    loss: Callable[[nn.Module, Batch], torch.Tensor] = _own_loss
    #: the tensors that define its function (parity checks)
    outputs: Callable[[nn.Module, Batch], Batch] = _answer_outputs
    #: its decoder's cross-attention reads the image (VQA's answer decoder reads the question)
    decoder_reads_image: bool = True
    #: its training batches carry answer labels
    answer_labels: bool = False
    #: test configs give it a wider vision tower, so cross-attention k/v have another input width than q
    #: (VQA's decoder attends to the text encoder, so there both widths match)
    wide_vision: bool = True


BLIP_CLASSES = {
    "BlipForImageTextRetrieval": BlipClass("retrieval", loss=_itm_itc_loss, outputs=_retrieval_outputs),
    "BlipForConditionalGeneration": BlipClass("caption", loss=_caption_loss, outputs=_caption_outputs),
    "BlipForQuestionAnswering": BlipClass("vqa", decoder_reads_image=False, answer_labels=True, wide_vision=False),
}
#: a model built on BLIP's modules but of another class (``blip_nlvr``): the plain behaviour
_OTHER = BlipClass(task="")


def blip_class(name: str) -> BlipClass:
    return BLIP_CLASSES.get(name, _OTHER)


class BlipModels(ModelFactory):
    """BLIP configs and processor for models built here."""

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

    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 99) -> Any:
        vision_hidden = hidden + hidden // 2 if blip_class(class_name).wide_vision else hidden
        return BlipConfig(
            text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=64,
                             bos_token_id=vocab - 2, sep_token_id=vocab - 1, pad_token_id=0),
            vision_config=dict(hidden_size=vision_hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=2 * vision_hidden, image_size=image_size, patch_size=patch_size),
            image_text_hidden_size=hidden,
        )


@register
class BlipAdapter(Adapter, BlipModels):
    family = "blip"
    model_types = ("blip",)
    aliases = {"blip": "Salesforce/blip-itm-base-coco", "blip-caption": "Salesforce/blip-image-captioning-base",
               "blip-vqa": "Salesforce/blip-vqa-base"}
    classes = {name: c.task for name, c in BLIP_CLASSES.items()}
    tasks = {"retrieval": "blip-retrieval", "caption": "blip-caption", "vqa": "blip-vqa"}
    #: the reference weighs an attention dimension as 36 MLP neurons ("12 heads × q, k, v"): --cost-weights paper
    paper_attn_weight = 36.0
    augment_policy = "blip-randaugment"  # BLIP's fine-tuning transform (also NLVR's and VQA's: each image flipped)
    towers = {"vision_model": "vision", "text_encoder": "text", "text_decoder": "decoder",
              "vision_proj": "vision", "text_proj": "text", "itm_head": "text", ITC_TEMP: "text"}
    feature_stacks = ("vision_model.encoder.layers", "text_encoder.encoder.layer", "text_decoder.bert.encoder.layer")

    def modules(self, model: nn.Module) -> list[ModuleSpec]:
        return [spec for path, mod in model.named_modules() for spec in self.specs_of(path, mod)]

    def build(self, class_name: str, config: Any) -> nn.Module:
        """A retrieval model carries the ITC temperature its training learns (``add_itc_temperature``)."""
        model = super().build(class_name, config)
        if blip_class(class_name).task == "retrieval":
            add_itc_temperature(model)
        return model

    def itc_temperature(self, model: nn.Module, value: float = ITC_TEMP_INIT) -> nn.Parameter:
        return add_itc_temperature(model, value)

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

    def behaviour(self, model: nn.Module) -> BlipClass:
        return blip_class(type(model).__name__)

    def module_tokens(self, model: nn.Module, spec: ModuleSpec, text_tokens: int) -> tuple[int, int]:
        if spec.role == "cross" and spec.tower == "decoder" and not self.behaviour(model).decoder_reads_image:
            return text_tokens, text_tokens
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
        # No encoder mask: every image token is attended, and an all-ones mask costs a check that reads the GPU.
        h = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                               encoder_hidden_states=image_seq).last_hidden_state
        return model.itm_head(h[:, 0])

    # ---- synthetic inputs -----------------------------------------------------------------
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
        if self.behaviour(model).answer_labels:
            batch["labels"] = rand_ids(batch_size, max(2, seq_len // 2), vocab - 2, generator, dev)
        return batch

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.behaviour(model).loss(model, batch)

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.behaviour(model).outputs(model, batch)


# ---- export graphs (``upop.exporters`` looks them up by class name) -------------------------------------
class _BlipShapes:
    """Example-input makers at a BLIP model's sizes (special ids stay out of the random text)."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        size = _image_size(cfg.vision_config)
        self.tokens = (size // cfg.vision_config.patch_size) ** 2 + 1
        self.width = cfg.vision_config.hidden_size
        self.pixels = _pixels(size)
        self.vocab_high = cfg.text_config.vocab_size - 2
        self.text = _text(self.vocab_high)

    def embeds(self, b: int, s: int) -> dict[str, torch.Tensor]:
        return {"image_embeds": 0.5 * torch.randn(b, self.tokens, self.width)}

    def embeds_and_text(self, b: int, s: int) -> dict[str, torch.Tensor]:
        return {**self.embeds(b, s), **self.text(b, s)}


@graphs_for("BlipForImageTextRetrieval")
def blip_retrieval_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    shapes = _BlipShapes(model)
    return [
        ExportGraph("image_encoder", Fn(model, lambda m, px: adapter.encode_image(m, px)), shapes.pixels,
                    ["image_embeds", "image_feat"],
                    {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}, "image_feat": {0: "batch"}}),
        ExportGraph("text_encoder", Fn(model, lambda m, ids, am: adapter.encode_text(m, ids, am)), shapes.text,
                    ["text_feat"], {**_seq_axes(), "text_feat": {0: "batch"}}),
        ExportGraph("itm", Fn(model, lambda m, emb, ids, am: adapter.itm_logits(m, emb, ids, am)),
                    shapes.embeds_and_text, ["itm_logits"],
                    {"image_embeds": {0: "batch"}, **_seq_axes(), "itm_logits": {0: "batch"}}),
    ]


def _blip_vision_graph(model: nn.Module, shapes: _BlipShapes) -> ExportGraph:
    return ExportGraph("vision_encoder", Fn(model, lambda m, px: m.vision_model(pixel_values=px).last_hidden_state),
                       shapes.pixels, ["image_embeds"], {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})


@graphs_for("BlipForQuestionAnswering")
def blip_vqa_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    shapes = _BlipShapes(model)
    qwidth = model.config.text_config.hidden_size

    def question(m: nn.Module, emb: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        att = torch.ones(emb.shape[:-1], dtype=torch.long, device=emb.device)
        return m.text_encoder(input_ids=ids, attention_mask=am, encoder_hidden_states=emb,
                              encoder_attention_mask=att).last_hidden_state

    def answer(m: nn.Module, q: torch.Tensor, qm: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        return m.text_decoder(input_ids=ids, attention_mask=am, encoder_hidden_states=q,
                              encoder_attention_mask=qm, use_cache=False).logits

    def answer_inputs(b: int, s: int) -> dict[str, torch.Tensor]:
        return {"question_embeds": 0.5 * torch.randn(b, s, qwidth), "question_mask": torch.ones(b, s, dtype=torch.long),
                **_text(shapes.vocab_high, "decoder_")(b, max(1, s // 2))}

    return [
        _blip_vision_graph(model, shapes),
        ExportGraph("question_encoder", Fn(model, question), shapes.embeds_and_text, ["question_embeds"],
                    {"image_embeds": {0: "batch"}, **_seq_axes(), "question_embeds": {0: "batch", 1: "sequence"}}),
        ExportGraph("answer_decoder", Fn(model, answer), answer_inputs, ["logits"],
                    {"question_embeds": {0: "batch", 1: "sequence"}, "question_mask": {0: "batch", 1: "sequence"},
                     "decoder_input_ids": {0: "batch", 1: "answer"}, "decoder_attention_mask": {0: "batch", 1: "answer"},
                     "logits": {0: "batch", 1: "answer"}}),
    ]


@graphs_for("BlipForConditionalGeneration")
def blip_caption_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    shapes = _BlipShapes(model)
    return [_blip_vision_graph(model, shapes), *_DecoderCache(model, shapes).graphs()]


class _DecoderCache:
    """Captioning decoder as two graphs with a per-layer KV cache (its shapes differ per layer
    after slimming): ``decoder_prefill`` over the prompt, then ``decoder_step`` for one token."""

    def __init__(self, model: nn.Module, shapes: _BlipShapes):
        self.model, self.shapes = model, shapes
        self.n = n = model.config.text_config.num_hidden_layers
        self.past_self = [f"past_self_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.present_self = [f"present_self_{kv}_{i}" for i in range(n) for kv in ("key", "value")]
        self.cross = [f"cross_{kv}_{i}" for i in range(n) for kv in ("key", "value")]

    def flat(self, cache: Any) -> list[torch.Tensor]:
        return [t for i in range(self.n) for t in (cache.layers[i].keys, cache.layers[i].values)]

    def prefill(self, m: nn.Module, emb: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        out = m.text_decoder(input_ids=ids, attention_mask=am, encoder_hidden_states=emb,
                             cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True)
        return (out.logits, *self.flat(out.cache.self_attention_cache), *self.flat(out.cache.cross_attention_cache))

    def step(self, m: nn.Module, emb: torch.Tensor, ids: torch.Tensor, am: torch.Tensor,
             *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import EncoderDecoderCache

        n = self.n
        data = [(past[2 * i], past[2 * i + 1], past[2 * n + 2 * i], past[2 * n + 2 * i + 1]) for i in range(n)]
        out = m.text_decoder(input_ids=ids, attention_mask=am, encoder_hidden_states=emb,
                             cache=EncoderDecoderCache(data), use_cache=True)
        return (out.logits, *self.flat(out.cache.self_attention_cache))

    def step_inputs(self, b: int, s: int) -> dict[str, torch.Tensor]:
        prompt = self.shapes.embeds_and_text(b, s)
        with torch.no_grad():
            outs = self.prefill(self.model, prompt["image_embeds"], prompt["input_ids"], prompt["attention_mask"])
        kv = dict(zip(self.past_self + [f"past_{n}" for n in self.cross], outs[1:]))
        return {"image_embeds": prompt["image_embeds"], "input_ids": torch.randint(1, 90, (b, 1)),
                "attention_mask": torch.ones(b, s + 1, dtype=torch.long), **kv}

    def graphs(self) -> list[ExportGraph]:
        prefill_axes = {"image_embeds": {0: "batch"}, "input_ids": {0: "batch", 1: "sequence"},
                        "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
                        **{n: {0: "batch", 2: "sequence"} for n in self.present_self},
                        **{n: {0: "batch"} for n in self.cross}}
        step_axes = {"image_embeds": {0: "batch"}, "input_ids": {0: "batch"}, "attention_mask": {0: "batch", 1: "total"},
                     **{n: {0: "batch", 2: "past"} for n in self.past_self},
                     **{f"past_{n}": {0: "batch"} for n in self.cross}, "logits": {0: "batch"},
                     **{n: {0: "batch", 2: "total"} for n in self.present_self}}
        return [
            ExportGraph("decoder_prefill", Fn(self.model, self.prefill), self.shapes.embeds_and_text,
                        ["logits", *self.present_self, *self.cross], prefill_axes),
            ExportGraph("decoder_step", Fn(self.model, self.step), self.step_inputs, ["logits", *self.present_self],
                        step_axes),
        ]
