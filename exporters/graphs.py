"""The graphs a deployment of each model class needs (ONNX / TensorRT), registered by class name.

A graph is a small module around the model that computes one deployable step (an encoder, a
head, one decoding step), with a way to make example inputs and the axes left dynamic. The
definitions live with the exporters, not the adapters: pruning never needs them. They may call
the adapter's task hooks (``encode_image``, ``encode_text``, ``itm_logits``) so that an exported
encoder computes exactly what evaluation computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["ExportGraph", "Fn", "export_graphs", "graph_classes", "graphs_for"]

Inputs = Callable[[int, int], dict[str, torch.Tensor]]
Axes = dict[str, dict[int, str]]
GraphsFn = Callable[[nn.Module, Any], list["ExportGraph"]]

_GRAPHS: dict[str, GraphsFn] = {}


class ExportGraph:
    """One graph of a deployment: a module wrapper, how to make its inputs, and its dynamic axes.

    ``make_inputs(batch, seq)`` returns the named inputs (in the wrapper's argument order); axes
    named "batch" and "sequence" are dynamic in the exported graph.
    """

    def __init__(self, name: str, module: nn.Module, make_inputs: Inputs, outputs: list[str], dynamic: Axes):
        self.name, self.module, self.make_inputs = name, module, make_inputs
        self.outputs, self.dynamic = outputs, dynamic


class Fn(nn.Module):
    """Wraps a function of (model, *inputs) as a module, so a graph exports only what it needs."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(self.model, *args)


def graphs_for(*class_names: str) -> Callable[[GraphsFn], GraphsFn]:
    """Registers a function ``(model, adapter) -> graphs`` for the named model classes."""

    def add(fn: GraphsFn) -> GraphsFn:
        for name in class_names:
            _GRAPHS[name] = fn
        return fn

    return add


def graph_classes() -> list[str]:
    return sorted(_GRAPHS)


def export_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    """The graphs a deployment of ``model`` needs; ``adapter`` is its family's adapter."""
    fn = _GRAPHS.get(type(model).__name__)
    if fn is None:
        raise NotImplementedError(f"{adapter.family}: no export graphs")
    return fn(model, adapter)


# ---- inputs and axes shared by the families ---------------------------------------------------
def _pixels(size: int) -> Inputs:
    return lambda b, s: {"pixel_values": torch.randn(b, 3, size, size)}


def _text(vocab_high: int, prefix: str = "") -> Callable[..., dict[str, torch.Tensor]]:
    def make(b: int, s: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}input_ids": torch.randint(1, vocab_high, (b, s)),
                f"{prefix}attention_mask": torch.ones(b, s, dtype=torch.long)}

    return make


def _seq_axes(prefix: str = "") -> Axes:
    return {f"{prefix}input_ids": {0: "batch", 1: "sequence"}, f"{prefix}attention_mask": {0: "batch", 1: "sequence"}}


def _image_size(vision_config: Any) -> int:
    size = vision_config.image_size
    return size if isinstance(size, int) else int(size[0])


def _joined(*makers: Inputs) -> Inputs:
    return lambda b, s: {k: v for make in makers for k, v in make(b, s).items()}


# ---- image classification ----------------------------------------------------------------------
@graphs_for("ViTForImageClassification", "DeiTForImageClassification")
def classifier_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    return [ExportGraph("classifier", Fn(model, lambda m, px: m(pixel_values=px).logits),
                        _pixels(_image_size(model.config)), ["logits"],
                        {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})]


# ---- dual encoders ---------------------------------------------------------------------------------
@graphs_for("CLIPModel", "SiglipModel")
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


# ---- BLIP -----------------------------------------------------------------------------------------
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
