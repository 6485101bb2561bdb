"""Decoder VLM export (``upop.adapters.vlm_graphs``, ``exporters/generate.py``): the four graphs of tiny Idefics3
and LLaVA models (Llama and Qwen2 language models, GQA), ONNX Runtime greedy generation token for token equal to
``generate(do_sample=False)``, unpruned and slimmed, the one-line refusals, and the profile rows."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn
from typer.testing import CliRunner

from upop.adapters.vlm_graphs import DecoderGraphs
from upop.errors import ExportFolderError, GraphInputError
from upop.exporters.generate import KvDecoder, flatten_images, greedy_generate
from upop.exporters.onnx import export_graph
from upop.exporters.runtime import OrtModel
from upop.exporters.timing import profile_ort

from ...conftest import randomize_

IMAGE_TOKEN, VOCAB, SIZE = 95, 96, 16
STD = 0.2
KINDS = ["idefics3-siglip-llama", "llava-clip-llama", "llava-siglip-qwen2"]


def _text(lm: str) -> dict:
    return dict(model_type=lm, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)


def _vision() -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4,
                image_size=SIZE)


def build(kind: str) -> nn.Module:
    """A tiny model of ``kind`` (random weights, seeded): 4 query heads over 2 KV heads in its language model."""
    family, vision, lm = kind.split("-")
    torch.manual_seed(0)
    if family == "idefics3":
        cfg = tf.Idefics3Config(vision_config=_vision(), text_config=_text(lm), scale_factor=2,
                                image_token_id=IMAGE_TOKEN)
        model = tf.Idefics3ForConditionalGeneration(cfg)
    else:
        vcfg = (tf.CLIPVisionConfig if vision == "clip" else tf.SiglipVisionConfig)(**_vision())
        cfg = tf.LlavaConfig(vision_config=vcfg, text_config=_text(lm), image_token_id=IMAGE_TOKEN,
                             vision_feature_layer=-2, projector_hidden_act="gelu",
                             vision_feature_select_strategy="default" if vision == "clip" else "full")
        model = tf.LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    return randomize_(model, std=STD).eval()  # decisive logits: a wrong position or cache changes the argmax


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.data[idx].clone())
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[idx].clone())
    lin.out_features = len(idx)


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.data[:, idx].clone())
    lin.in_features = len(idx)


def _span(units: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def slim(model: nn.Module) -> nn.Module:
    """Structured slimming as upop's slim step leaves a model, layer by layer (the family adapters that run it on
    these classes are not on this branch): the LM's layer 0 loses a whole KV group with its query heads (1 KV
    head left, 2 in layer 1), layer 1 half its gated-MLP channels, the vision tower's layer 0 two of its 4 heads."""
    lm = model.model.text_model if hasattr(model.model, "text_model") else model.model.language_model
    attn, hd = lm.layers[0].self_attn, lm.layers[0].self_attn.head_dim
    group = attn.num_key_value_groups
    _keep_rows(attn.q_proj, _span(list(range(group)), hd))
    _keep_rows(attn.k_proj, _span([0], hd))
    _keep_rows(attn.v_proj, _span([0], hd))
    _keep_cols(attn.o_proj, _span(list(range(group)), hd))
    mlp = lm.layers[1].mlp
    keep = torch.arange(0, mlp.gate_proj.out_features, 2)
    _keep_rows(mlp.gate_proj, keep)
    _keep_rows(mlp.up_proj, keep)
    _keep_cols(mlp.down_proj, keep)
    vision = model.model.vision_model if hasattr(model.model, "vision_model") else model.model.vision_tower
    vattn = vision.encoder.layers[0].self_attn
    heads = _span([1, 3], vattn.head_dim)
    for lin in (vattn.q_proj, vattn.k_proj, vattn.v_proj):
        _keep_rows(lin, heads)
    _keep_cols(vattn.out_proj, heads)
    return model


class _Patcher:
    """The size patches upop's slim step asks of an adapter (``upop.adapters.base``'s, for these modules)."""

    def patch_gqa(self, model, spec, kept, granularity):
        from upop.pruning.kinds.gqa import patch_rotary_attention

        patch_rotary_attention(model, spec, kept, granularity)

    def patch_mlp(self, model, spec, width):
        pass

    def patch_attention(self, model, spec, num_heads, head_dim):
        mod = model.get_submodule(spec.name)
        mod.num_heads, mod.head_dim = num_heads, head_dim


def slim_with_kinds(model: nn.Module) -> nn.Module:
    """The model slimmed by upop's own unit kinds (``upop.pruning.kinds``), every layer differently: LM layer 0 keeps 2
    of its 4 rotary pairs in every head (``dim``: head width 8 → 4, the rotary tables cut to match), layer 1 one of its 2
    KV groups with its query heads (``head``); both gated MLPs keep a third of their channels; the vision tower's
    layer 0 keeps 3 of its 4 heads, layer 1 5 of 8 head dimensions."""
    from upop.pruning.kinds.attention import AttentionSpec, InProj
    from upop.pruning.kinds.gated_mlp import GatedMLPSpec
    from upop.pruning.kinds.gqa import GQASpec

    lm = "model.text_model" if hasattr(model.model, "text_model") else "model.language_model"
    vision = "model.vision_model" if hasattr(model.model, "vision_model") else "model.vision_tower"
    text = model.config.text_config
    for i, (keep, granularity) in enumerate([([0, 3], "dim"), ([1], "head")]):
        a = f"{lm}.layers.{i}.self_attn"
        GQASpec(a, "language", f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj", text.num_attention_heads,
                text.num_key_value_heads, 8).slim(model, keep, granularity, None, _Patcher())
        m = f"{lm}.layers.{i}.mlp"
        GatedMLPSpec(m, "language", f"{m}.gate_proj", f"{m}.up_proj", f"{m}.down_proj", 48).slim(
            model, list(range(0, 48, 3)), "neuron", None, _Patcher())
    for i, (keep, granularity) in enumerate([([0, 2, 3], "head"), ([0, 1, 4, 6, 7], "dim")]):
        a = f"{vision}.encoder.layers.{i}.self_attn"
        AttentionSpec(a, "vision", "self", tuple(InProj(f"{a}.{n}") for n in ("q_proj", "k_proj", "v_proj")),
                      f"{a}.out_proj", 4, 8).slim(model, keep, granularity, None, _Patcher())
    return model


def export(model: nn.Module, folder, fp16: bool = False) -> OrtModel:
    folder.mkdir(parents=True)
    graphs = DecoderGraphs(model).graphs()
    entries = [export_graph(g, folder, fp16=fp16) for g in graphs]
    (folder / "export.json").write_text(json.dumps({"task": "vqa", "graphs": entries,
                                                    "tokens": {"image_token_id": IMAGE_TOKEN}}))
    return OrtModel(folder, providers=["CPUExecutionProvider"])


SLIMS = {"": None, "-slim": slim, "-kinds": slim_with_kinds}


@pytest.fixture(scope="module", params=[(k, s) for k in KINDS for s in SLIMS], ids=[k + s for k in KINDS for s in SLIMS])
def exported(request, tmp_path_factory):
    kind, how = request.param
    model = SLIMS[how](build(kind)) if SLIMS[how] else build(kind)
    folder = tmp_path_factory.mktemp("vlm") / "onnx"
    return kind, how, model, export(model, folder)


def _prompt(model: nn.Module, batch: int = 2, seed: int = 1):
    """Images and a left-padded prompt (row 0 has two pads) whose image tokens match the images' features."""
    with torch.no_grad():
        tokens = DecoderGraphs(model).graphs()[0].module(torch.zeros(1, 3, SIZE, SIZE)).shape[1]
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    ids = torch.randint(3, IMAGE_TOKEN - 1, (batch, 9 + tokens), generator=g)
    ids[:, 3:3 + tokens] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    mask[0, :2], ids[0, :2] = 0, 0
    return px, ids, mask


def _generate(model: nn.Module, px, ids, mask, new: int) -> np.ndarray:
    images = px[:, None] if isinstance(model, tf.Idefics3ForConditionalGeneration) else px
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=new,
                              do_sample=False, num_beams=1).numpy()


def test_graphs_export_with_parity_and_dynamic_cache_axes(exported):
    _kind, how, model, ort = exported
    graphs = {g["name"]: g for g in ort.manifest["graphs"]}
    assert list(graphs) == ["vision_encoder", "embed_tokens", "decoder_prefill", "decoder_step"]
    for g in graphs.values():
        assert {p["batch"] for p in g["parity"]} == {1, 3}
        assert all(p["max_abs"] <= 1e-4 for p in g["parity"])
    step = {i["name"]: i["shape"] for i in graphs["decoder_step"]["inputs"]}
    assert step["inputs_embeds"] == ["batch", 1, 32] and step["attention_mask"] == ["batch", "total"]
    # GQA: the cache holds the KV heads (2 for 4 query heads), per layer as slimmed; past length dynamic
    shapes = {"": [(2, 8), (2, 8)], "-slim": [(1, 8), (2, 8)], "-kinds": [(2, 4), (1, 8)]}[how]
    for i, (heads, width) in enumerate(shapes):
        assert step[f"past_key_{i}"] == step[f"past_value_{i}"] == ["batch", heads, "past", width]
    prefill = {o["name"]: o["shape"] for o in graphs["decoder_prefill"]["outputs"]}
    assert prefill["present_key_1"][:3] == ["batch", shapes[1][0], "sequence"] and prefill["logits"][::2] == ["batch", VOCAB]


def test_ort_greedy_generation_equals_generate_token_for_token(exported):
    _kind, _how, model, ort = exported
    px, ids, mask = _prompt(model)
    ref = _generate(model, px, ids, mask, new=12)
    got = greedy_generate(ort, ids.numpy(), mask.numpy(), eos=2, pad=0, max_new_tokens=12, pixel_values=px.numpy(),
                          image_token_id=IMAGE_TOKEN)
    assert ref.shape[1] > ids.shape[1] + 4  # it really generated
    np.testing.assert_array_equal(got, ref)


def test_a_row_that_ends_is_padded_as_generate_pads_it(llava):
    model, ort = llava
    px, ids, mask = _prompt(model)
    free = _generate(model, px, ids, mask, new=8)
    end = [int(free[0, ids.shape[1] + 3]), int(free[1, ids.shape[1] + 2])]  # two end tokens, as configs list them
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, do_sample=False,
                             eos_token_id=end, pad_token_id=0).numpy()
    got = greedy_generate(ort, ids.numpy(), mask.numpy(), eos=end, pad=0, max_new_tokens=8, pixel_values=px.numpy(),
                          image_token_id=IMAGE_TOKEN)
    assert ref.shape[1] < free.shape[1] and (ref[:, -1] == 0).any()  # each row ended, on its own end token
    assert end[1] not in free[0, ids.shape[1]:ref.shape[1]] and end[0] not in free[1, ids.shape[1]:ref.shape[1]]
    np.testing.assert_array_equal(got, ref)


def test_idefics3_batch_with_a_padding_image_generates_as_the_model_does(tmp_path):
    """A processor's batch: row 0 holds two images, row 1 one and an all-zero padding image, which the host drops."""
    model = build("idefics3-siglip-llama")
    ort = export(model, tmp_path / "onnx")
    tokens = 4  # (16 / 4)² patches, pixel-shuffled by 2²
    g = torch.Generator().manual_seed(5)
    px = torch.randn(2, 2, 3, SIZE, SIZE, generator=g)
    px[1, 1] = 0
    ids = torch.randint(3, IMAGE_TOKEN - 1, (2, 6 + 2 * tokens), generator=g)
    ids[0, 1:1 + 2 * tokens] = IMAGE_TOKEN
    ids[1, 2 * tokens - 2:3 * tokens - 2] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, do_sample=False).numpy()
    got = greedy_generate(ort, ids.numpy(), mask.numpy(), eos=2, pad=0, max_new_tokens=8, pixel_values=px.numpy(),
                          image_token_id=IMAGE_TOKEN)
    np.testing.assert_array_equal(got, ref)
    pixel_mask = np.ones((2, 2, SIZE, SIZE), bool)
    pixel_mask[0, 0, :, -4:] = False  # an image padded inside
    with pytest.raises(GraphInputError) as exc:
        flatten_images(px.numpy(), pixel_mask)
    assert "whole images" in _one_line(exc)


@pytest.mark.parametrize("kind", ["idefics3-siglip-llama", "llava-siglip-qwen2"])
def test_fp16_graphs_pass_their_parity_and_generate(kind, tmp_path):
    model = build(kind)
    ort = export(model, tmp_path / "onnx", fp16=True)
    for g in ort.manifest["graphs"]:
        assert all(p["max_abs"] <= p["tolerance"] for p in g["fp16"]["parity"])
    half = OrtModel(ort.dir, fp16=True, providers=["CPUExecutionProvider"])
    px, ids, mask = _prompt(model)
    got = greedy_generate(half, ids.numpy(), mask.numpy(), eos=2, pad=0, max_new_tokens=4, pixel_values=px.numpy(),
                          image_token_id=IMAGE_TOKEN)
    assert got.shape == (2, ids.shape[1] + 4)  # padded generation runs in FP16 (its tokens may differ from FP32's)
    dec = KvDecoder(half)
    logits, state = dec.prefill(dec.prompt_embeds(ids.numpy(), dec.image_features(px.numpy()), IMAGE_TOKEN), mask.numpy())
    logits, state = dec.step(dec.embed(logits.argmax(-1)[:, None]), state)
    assert np.isfinite(logits).all() and all(np.isfinite(v).all() for v in state.past.values())


def test_vision_graph_is_the_model_s_image_features(exported):
    kind, _how, model, ort = exported
    px = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        if kind.startswith("idefics3"):
            ref = torch.stack(model.model.get_image_features(px[:, None]).pooler_output)
        else:
            ref = torch.stack(list(model.model.get_image_features(
                px, vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output))
    (got,) = ort.run("vision_encoder", pixel_values=px.numpy())
    assert got.shape == tuple(ref.shape) and got.shape[-1] == model.config.text_config.hidden_size
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model = build("llava-clip-llama")
    return model, export(model, tmp_path_factory.mktemp("llava") / "onnx")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def test_a_step_fed_a_wrong_past_length_fails_in_one_line(llava):
    model, ort = llava
    px, ids, mask = _prompt(model)
    dec = KvDecoder(ort)
    logits, state = dec.prefill(dec.prompt_embeds(ids.numpy(), dec.image_features(px.numpy()), IMAGE_TOKEN), mask.numpy())
    token = dec.embed(logits.argmax(-1)[:, None])
    state.past["past_key_1"] = state.past["past_key_1"][:, :, :-1]
    with pytest.raises(GraphInputError) as exc:
        dec.step(token, state)
    assert "past_key_1" in _one_line(exc) and "past length" in str(exc.value)
    state.past = {}
    with pytest.raises(GraphInputError) as exc:
        dec.step(token, state)
    assert "past key/values" in _one_line(exc)


def test_a_graph_missing_an_input_or_images_not_matching_the_prompt_fail_in_one_line(llava):
    model, ort = llava
    px, ids, mask = _prompt(model)
    with pytest.raises(ExportFolderError) as exc:
        ort.run("decoder_prefill", inputs_embeds=np.zeros((1, 4, 32), np.float32), attention_mask=np.ones((1, 4), np.int64))
    assert "position_ids" in _one_line(exc)
    with pytest.raises(GraphInputError) as exc:  # one image for a prompt written for two
        greedy_generate(ort, ids.numpy(), mask.numpy(), eos=2, pad=0, max_new_tokens=2, pixel_values=px[:1].numpy(),
                        image_token_id=IMAGE_TOKEN)
    assert "image tokens" in _one_line(exc)


def test_profile_rows_name_prefill_length_and_decode_tokens_per_second(llava, tmp_path):
    _model, ort = llava
    rows = {r.graph: r for r in profile_ort(ort.dir, "original", [1, 2], warmup=0, runs=2, threads=1) if r.batch == 2}
    assert set(rows) == {"vision_encoder", "embed_tokens", "decoder_prefill", "decoder_step"}
    assert rows["decoder_prefill"].tokens == "sequence 32" and rows["decoder_prefill"].tokens_per_s is None
    step = rows["decoder_step"]
    assert step.tokens == "past 32" and step.tokens_per_s == pytest.approx(2000.0 / step.p50_ms)
    assert rows["vision_encoder"].tokens == "" and rows["vision_encoder"].p50_ms > 0


def test_upop_profile_compares_original_and_slim_graphs(llava, tmp_path):
    from upop_cli.app import app

    _model, ort = llava
    slim_ort = export(slim(build("llava-clip-llama")), tmp_path / "slim")
    res = CliRunner().invoke(app, ["profile", str(slim_ort.dir), "--runtime", "onnxruntime", "--compare", str(ort.dir),
                                   "--batch", "1", "--warmup", "0", "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    runs = json.loads(res.stdout)["runs"]
    steps = [r for r in runs if r["graph"] == "decoder_step"]
    assert len(steps) == 2 and all(r["tokens"] == "past 32" and r["tokens_per_s"] > 0 for r in steps)
    assert {r["target"] for r in runs} == {str(slim_ort.dir), str(ort.dir)}


def test_pytorch_profile_rows_time_the_same_stages(llava):
    from upop.exporters.timing import profile_torch

    model, _ort = llava
    rows = {r.graph: r for r in profile_torch(model, None, "original", [2], torch.device("cpu"), warmup=0, runs=2)}
    assert list(rows) == ["vision_encoder", "embed_tokens", "decoder_prefill", "decoder_step"]
    assert rows["decoder_step"].tokens == "past 32" and rows["decoder_step"].tokens_per_s > 0
    assert rows["decoder_prefill"].tokens == "sequence 32" and rows["decoder_prefill"].tokens_per_s is None


def test_the_adapters_package_registers_the_graphs_by_itself():
    import subprocess
    import sys

    code = ("import upop.adapters; from upop.adapters.graphs import graph_classes; "
            "print(sorted({'Idefics3ForConditionalGeneration', 'LlavaForConditionalGeneration'} - set(graph_classes())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
