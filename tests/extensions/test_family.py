"""A model family in one file: a toy image classifier on a tiny Llama stack (grouped-query attention, rotary
embeddings, a gated MLP), defined and registered here, then compressed on the built-in shapes set, saved,
reloaded, exported to ONNX, profiled and inspected, editing no other file (docs/extending.md, "A family").

The stack is run as transformers' LlamaModel runs it (causal self-attention over the patch tokens), on
``inputs_embeds`` from a patch embedding, mean-pooled into a linear head.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

import upop
from upop.adapters import Adapter, ModelFactory, register
from upop.adapters import base as adapter_registry
from upop.adapters import graphs as graph_registry
from upop.adapters.graphs import ExportGraph, Fn, graphs_for
from upop.pruning.kinds import GatedMLPSpec, GQASpec
from upop_cli.app import app


class ToyConfig(transformers.LlamaConfig):
    model_type = "upop_toy_gqa"


class ToyGQAForImageClassification(transformers.PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "decoder"

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.patch = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.decoder = transformers.LlamaModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_: Any):
        tokens = self.patch(pixel_values).flatten(2).transpose(1, 2)
        # an explicit all-ones mask: without one, transformers looks for packed sequences (aten::diff, no ONNX op)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        pooled = self.decoder(inputs_embeds=tokens, attention_mask=mask, use_cache=False).last_hidden_state.mean(1)
        logits = self.classifier(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return transformers.modeling_outputs.ImageClassifierOutput(loss=loss, logits=logits)


class ToyModels(ModelFactory):
    family = "toy_gqa"

    def image_processor(self, size: int) -> Any:
        return transformers.ViTImageProcessorPil(size={"height": size, "width": size})

    def random_config(self, class_name: str, hidden: int = 32, layers: int = 2, heads: int = 4,
                      image_size: int = 32, patch_size: int = 8, vocab: int = 16) -> Any:
        return ToyConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=8,
                         image_size=image_size, patch_size=patch_size, num_labels=12)


class ToyAdapter(Adapter, ToyModels):
    family = "toy_gqa"
    model_types = ("upop_toy_gqa",)
    classes = {"ToyGQAForImageClassification": "classification"}
    tasks = {"classification": "classification"}
    towers = {"patch": "vision", "decoder": "vision", "classifier": "head"}
    feature_stacks = ("decoder.layers",)

    def _resolve_class(self, name: str) -> type[nn.Module]:
        return ToyGQAForImageClassification

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        return ToyConfig(**{k: v for k, v in data.items() if k != "model_type"})

    def modules(self, model: nn.Module) -> list:
        specs: list = []
        for i, layer in enumerate(model.decoder.layers):
            a, m, hd = f"decoder.layers.{i}.self_attn", f"decoder.layers.{i}.mlp", layer.self_attn.head_dim
            specs.append(GQASpec(name=a, tower="vision", q_proj=f"{a}.q_proj", k_proj=f"{a}.k_proj",
                                 v_proj=f"{a}.v_proj", o_proj=f"{a}.o_proj",
                                 num_heads=layer.self_attn.q_proj.out_features // hd,
                                 num_kv_heads=layer.self_attn.k_proj.out_features // hd, head_dim=hd))
            specs.append(GatedMLPSpec(name=m, tower="vision", gate=f"{m}.gate_proj", up=f"{m}.up_proj",
                                      down=f"{m}.down_proj", width=layer.mlp.up_proj.out_features))
        return specs

    def image_tokens(self, model: nn.Module) -> int:
        return (model.config.image_size // model.config.patch_size) ** 2

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
                "labels": torch.randint(0, model.config.num_labels, (batch_size,), generator=generator)}

    def native_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def forward_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(pixel_values=batch["pixel_values"]).logits}


def toy_graphs(model: nn.Module, adapter: Any) -> list[ExportGraph]:
    size = model.config.image_size
    return [ExportGraph("classifier", Fn(model, lambda m, px: m(pixel_values=px).logits),
                        lambda b, s: {"pixel_values": torch.randn(b, 3, size, size)}, ["logits"],
                        {"pixel_values": {0: "batch"}, "logits": {0: "batch"}})]


@pytest.fixture
def toy_family(monkeypatch):
    """The family registered for this test only (the registries are restored after it)."""
    monkeypatch.setattr(adapter_registry, "_REGISTRY", dict(adapter_registry._REGISTRY))
    monkeypatch.setattr(graph_registry, "_GRAPHS", dict(graph_registry._GRAPHS))
    register(ToyAdapter)
    graphs_for("ToyGQAForImageClassification")(toy_graphs)
    return upop.adapters.get_adapter("upop_toy_gqa")


def _cli(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("granularity", ["dim", "head"])
def test_a_family_defined_here_compresses_exports_and_profiles(toy_family, granularity, tmp_path):
    from upop.models.demo import shapes_dir
    from upop.tasks import Preprocessor

    torch.manual_seed(0)
    model = toy_family.build("ToyGQAForImageClassification", toy_family.random_config("ToyGQAForImageClassification"))
    cfg = upop.CompressConfig(ratio=0.5, granularity=granularity,
                              search=upop.SearchConfig(steps=4, update_every=1), retrain=upop.RetrainConfig(epochs=0))
    prep = Preprocessor(None, toy_family.image_processor(32))
    result = upop.compress(model, cfg, data=shapes_dir(), task="classification", preprocessor=prep, batch_size=8,
                           eval_limit=16, latency=False)
    slim = result.save(tmp_path / "slim")
    prep.image_processor.save_pretrained(slim)

    # the kinds slimmed the stack: fewer KV groups or rotary pairs, and narrower gated MLPs
    units = {}
    for spec in toy_family.modules(result.model):
        units[spec.kind] = units.get(spec.kind, 0) + spec.num_units(granularity)
    assert units["gqa"] < 2 * (4 if granularity == "dim" else 2) and units["gated_mlp"] < 2 * 48, units

    # the checkpoint reloads to the same function (the rotary slicing is replayed with the slimming)
    loaded = upop.load(slim)
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(pixel_values=px).logits - result.model.eval()(pixel_values=px).logits).abs().max() <= 1e-5

    _cli("export", str(slim), "--out", str(tmp_path / "onnx"), "--quiet")  # checks ONNX against PyTorch
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["graphs"][0]["name"] == "classifier"
    out = _cli("profile", str(tmp_path / "onnx"), "--runtime", "ort", "--batch", "2", "--warmup", "1", "--runs", "2")
    assert "classifier" in out or "ms" in out
    rows = json.loads(_cli("inspect", str(slim), "--json"))["modules"]
    assert {r["kind"] for r in rows} == {"gqa", "gated_mlp"}
