"""Decoder VLMs (LLaVA with CLIP + Llama, SigLIP + Qwen2 and CLIP + Mistral towers, Idefics3/SmolVLM): every unit kind slims to
exactly the masked model inside the full model, one ranking spans both towers at their real costs, and the slim
checkpoint reloads and compresses again."""

import pytest
import torch

import upop
from upop.adapters import get_adapter
from upop.errors import ConfigError
from upop.pruning.masks import MaskSet
from upop.pruning.search import UnitTable, select_units, unified_scores
from upop.pruning.slim import slim_model

from ...conftest import batches_for, build_tiny

#: (id, family, class, random_config's tower choice)
VARIANTS = [
    ("llava-clip-llama", "llava", "LlavaForConditionalGeneration", {"vision": "clip", "text": "llama"}),
    ("llava-siglip-qwen2", "llava", "LlavaForConditionalGeneration", {"vision": "siglip", "text": "qwen2"}),
    ("llava-clip-mistral", "llava", "LlavaForConditionalGeneration", {"vision": "clip", "text": "mistral"}),
    ("idefics3", "idefics3", "Idefics3ForConditionalGeneration", {}),
]
KINDS = ["attn", "mlp", "gqa", "gated_mlp"]


def tiny_vlm(variant: str, seed: int = 0):
    _id, family, class_name, towers = next(v for v in VARIANTS if v[0] == variant)
    return get_adapter(family), build_tiny(family, class_name, seed=seed, **towers)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gran", ["dim", "head"])
@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_each_kind_slims_to_the_masked_model_inside_the_whole_vlm(variant, gran, kind):
    """Only ``kind``'s modules lose units (random ones, the kept ones scaled by non-binary mask values to fold)."""
    adapter, model = tiny_vlm(variant)
    specs = adapter.modules(model)
    assert {s.tower for s in specs if s.kind == kind} == {"vision" if kind in ("attn", "mlp") else "language"}
    batch = batches_for(adapter, model, n=1)[0]
    masks, g = MaskSet(model, specs, gran), torch.Generator().manual_seed(3)
    kept, values = {}, {}
    with torch.no_grad():
        for spec, z in masks.items():
            n = z.numel()
            k = n if spec.kind != kind else int(torch.randint(1, n, (1,), generator=g))
            kept[spec.name] = sorted(torch.randperm(n, generator=g)[:k].tolist())
            values[spec.name] = (0.5 + torch.rand(n, generator=g)) if spec.kind == kind else torch.ones(n)
            z.copy_(torch.zeros(n).index_fill(0, torch.tensor(kept[spec.name]), 1.0) * values[spec.name])
        masked = adapter.forward_outputs(model, batch)["logits"]
    masks.remove()
    slim_model(model, specs, kept, gran, adapter, zeta={k: v.tolist() for k, v in values.items()})
    with torch.no_grad():
        slim = adapter.forward_outputs(model, batch)["logits"]
    assert (masked - slim).abs().max() <= 1e-5
    shrunk = [s for s in adapter.modules(model) if s.num_units(gran) < next(o for o in specs if o.name == s.name)
              .num_units(gran)]
    assert shrunk and {s.kind for s in shrunk} == {kind}


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_unit_costs_are_the_parameters_a_unit_removes_in_both_towers(variant):
    adapter, model = tiny_vlm(variant)
    specs = adapter.modules(model)
    before = sum(p.numel() for p in model.parameters())
    costs = {s.tower: 0.0 for s in specs}
    for s in specs:
        costs[s.tower] += s.unit_cost(model, "dim")
    slim_model(model, specs, {s.name: list(range(1, s.num_units("dim"))) for s in specs}, "dim", adapter)
    assert before - sum(p.numel() for p in model.parameters()) == sum(costs.values())
    assert set(costs) == {"vision", "language"}


def _ranked(variant: str, unimportant: str, share: float = 0.3):
    """The towers of the units one ranking removes first when ``unimportant``'s units score highest."""
    adapter, model = tiny_vlm(variant)
    specs = adapter.modules(model)
    table = UnitTable.build(model, specs, "dim")
    g = torch.Generator().manual_seed(0)
    towers = [specs[int(i)].tower for i in table.module_of_unit]
    importance = torch.tensor([(5.0 if t == unimportant else 0.0) for t in towers], dtype=torch.float64)
    importance += torch.rand(importance.shape, generator=g, dtype=torch.float64)
    marked = select_units(unified_scores(importance, table), table, share)
    removed = {t for t, m in zip(towers, marked.tolist()) if m}
    return removed, float(table.cost[marked].sum()) / table.total_cost


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
@pytest.mark.parametrize("cheap", ["language", "vision"])
def test_one_ranking_spans_both_towers(variant, cheap):
    """Units of both towers are in one list at their real costs: when the language model's units matter least
    the whole share comes out of the language model, and when the vision tower's do, out of the vision tower."""
    removed, share = _ranked(variant, cheap)
    assert removed == {cheap}
    assert share >= 0.3


def _compress(model, adapter, ratio=0.5, **search):
    cfg = upop.CompressConfig(ratio=ratio, search=upop.SearchConfig(steps=3, update_every=1, lr=1e-3, **search),
                              retrain=upop.RetrainConfig(epochs=1, lr=1e-3))
    batches = batches_for(adapter, model, n=3)
    return upop.compress(model, cfg, batches=batches, latency=False)  # the loss: the adapter's native_loss


@pytest.mark.parametrize("searched,other", [("language", "vision"), ("vision", "language")])
@pytest.mark.parametrize("variant", ["llava-siglip-qwen2", "idefics3"])
def test_towers_language_leaves_the_vision_tower_bit_identical(variant, searched, other):
    """--towers language (and the other way round): the tower left out comes out of search, slimming and retrain
    with every weight as it went in; the searched one shrinks."""
    adapter, model = tiny_vlm(variant)
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if adapter.tower_of(n) == other}
    searched_before = sum(p.numel() for n, p in model.named_parameters() if adapter.tower_of(n) == searched)
    result = _compress(model, adapter, towers=searched)
    after = dict(result.model.named_parameters())
    assert kept and all(torch.equal(after[n], v) for n, v in kept.items())
    assert sum(p.numel() for n, p in after.items() if adapter.tower_of(n) == searched) < searched_before
    assert all(p.requires_grad for p in result.model.parameters())  # trainable again, as it came
    rows = {r["module"]: r for r in result.report.modules}
    assert all(r["kept"] == r["units"] for r in rows.values() if r["tower"] == other)


def test_a_tower_the_model_lacks_is_one_line():
    adapter, model = tiny_vlm("idefics3")
    with pytest.raises(ConfigError, match="--towers: this model has no tower text; its towers: vision, "
                                                      "language"):
        _compress(model, adapter, towers="text")


@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
def test_the_slim_checkpoint_reloads_and_compresses_again(variant, tmp_path):
    adapter, model = tiny_vlm(variant)
    batch = batches_for(adapter, model, n=1, seed=9)[0]
    first = _compress(model, adapter, ratio=0.4)
    folder = first.save(tmp_path / "one")
    loaded = upop.load(folder)
    with torch.no_grad():
        want = adapter.forward_outputs(first.model.eval(), batch)["logits"]
        assert (adapter.forward_outputs(loaded, batch)["logits"] - want).abs().max() <= 1e-5
    n_first = sum(p.numel() for p in loaded.parameters())
    cfg = upop.CompressConfig(ratio=0.3, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    second = upop.compress(str(folder), cfg, batches=batches_for(adapter, loaded, n=2), latency=False)
    again = upop.load(second.save(tmp_path / "two"))
    assert sum(p.numel() for p in again.parameters()) < n_first
    with torch.no_grad():
        want = adapter.forward_outputs(second.model.eval(), batch)["logits"]
        assert (adapter.forward_outputs(again, batch)["logits"] - want).abs().max() <= 1e-5


def test_llava_vision_layers_after_the_feature_layer_are_not_units():
    """LLaVA-1.5 reads the vision tower's second-to-last hidden state: the last layer never reaches the LM."""
    adapter, model = tiny_vlm("llava-clip-llama")
    vision = lambda: {s.name.split(".")[4] for s in adapter.modules(model) if s.tower == "vision"}  # noqa: E731
    assert model.config.vision_feature_layer == -2 and vision() == {"0"}
    model.config.vision_feature_layer = -1
    assert vision() == {"0", "1"}
    model.config.vision_feature_layer = [0, -2]
    assert vision() == {"0"}


@pytest.mark.slow
def test_smolvlm_256m_shape_slims_exactly():
    """At SmolVLM-256M's real shapes (9 query heads over 3 KV heads of 64 dims, 512 px images, pixel shuffle by 4;
    random weights, from benchmarks/vlm_memory.py's config shapes): half of every module's units kept, the slim
    model computes the masked one."""
    from benchmarks.vlm_memory import MODELS

    adapter = get_adapter("idefics3")
    torch.manual_seed(0)
    model = adapter.build("Idefics3ForConditionalGeneration", adapter.config_from_dict(dict(MODELS["SmolVLM-256M"])))
    batch = adapter.example_inputs(model.eval(), batch_size=1, seq_len=8, generator=torch.Generator().manual_seed(0))
    specs, g = adapter.modules(model), torch.Generator().manual_seed(1)
    masks = MaskSet(model, specs, "dim")
    kept = {s.name: sorted(torch.randperm(z.numel(), generator=g)[: z.numel() // 2].tolist()) for s, z in masks.items()}
    with torch.no_grad():
        for s, z in masks.items():
            z.zero_()[kept[s.name]] = 1.0
        masked = adapter.forward_outputs(model, batch)["logits"]
    masks.remove()
    slim_model(model, specs, kept, "dim", adapter)
    with torch.no_grad():
        assert (adapter.forward_outputs(model, batch)["logits"] - masked).abs().max() <= 1e-5
    assert sum(p.numel() for p in model.parameters()) < 0.7 * 256_484_928


def test_a_bf16_checkpoint_opens_with_fp32_weights(tmp_path):
    """SmolVLM and LLaVA are published in bf16; transformers 5 would load them so (dtype "auto"), and AMP's fp32
    master weights would be bf16: the search's small updates would round away."""
    from upop.models.hub import load_pretrained

    _adapter, model = tiny_vlm("idefics3")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    loaded = load_pretrained(str(tmp_path / "m")).model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())
