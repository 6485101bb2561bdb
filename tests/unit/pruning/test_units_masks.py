import torch

from upop.pruning.kinds import ATTENTION, MLP
from upop.pruning.masks import MaskSet
from upop.pruning.units import AttentionSpec, InProj, MLPSpec

from ...conftest import batches_for


def test_every_family_lists_attention_and_mlp_in_every_tower(tiny):
    adapter, model = tiny
    name = type(model).__name__
    specs = adapter.modules(model)
    towers = {s.tower for s in specs}
    layers = 1 if name == "LlavaForConditionalGeneration" else 2  # LLaVA's vision tower: the layers the LM reads
    for tower in towers:
        groups = [s.group for s in specs if s.tower == tower]  # attention-like and MLP-like kinds
        assert groups.count(ATTENTION) >= layers and groups.count(MLP) >= layers
    expected = {"BlipForImageTextRetrieval": {"vision", "text"}, "BlipForConditionalGeneration": {"vision", "decoder"},
                "BlipForQuestionAnswering": {"vision", "text", "decoder"}, "CLIPModel": {"vision", "text"},
                "SiglipModel": {"vision", "text"}, "ViTForImageClassification": {"vision"},
                "DeiTForImageClassification": {"vision"}, "BlipNlvrForVisualReasoning": {"vision", "text"},
                "LlavaForConditionalGeneration": {"vision", "language"},
                "Idefics3ForConditionalGeneration": {"vision", "language"}}[name]
    assert towers == expected
    if name.startswith("Blip"):
        # BLIP text layers cross-attend (to the image, or to the question for VQA's decoder).
        assert any(s.role == "cross" for s in specs)
    if name == "BlipNlvrForVisualReasoning":  # both branches of every twin cross-attention are in the ranking
        cross = [s.name for s in specs if s.role == "cross"]
        assert len(cross) == 2 * layers and {n[-5:] for n in cross} == {"self0", "self1"}


def test_masks_all_ones_is_the_same_function(tiny):
    adapter, model = tiny
    batch = batches_for(adapter, model, n=1)[0]
    with torch.no_grad():
        ref = adapter.forward_outputs(model, batch)
    for gran in ("dim", "head"):
        masks = MaskSet(model, adapter.modules(model), gran)
        with torch.no_grad():
            out = adapter.forward_outputs(model, batch)
        masks.remove()
        for k in ref:
            assert torch.equal(ref[k], out[k]), (gran, k)


def test_masks_are_not_model_parameters(tiny):
    adapter, model = tiny
    before = {id(p) for p in model.parameters()}
    masks = MaskSet(model, adapter.modules(model), "dim")
    assert before == {id(p) for p in model.parameters()}
    assert not any(id(z) in before for _s, z in masks.items())
    masks.remove()


def test_mask_gradients_reach_every_module(tiny):
    adapter, model = tiny
    batch = batches_for(adapter, model, n=1)[0]
    masks = MaskSet(model, adapter.modules(model), "dim")
    adapter.native_loss(model.train(), batch).backward()
    for spec, z in masks.items():
        assert z.grad is not None and z.grad.abs().sum() > 0, spec.name
    masks.remove()


def _linear_model():
    m = torch.nn.Module()
    m.q, m.k, m.v = torch.nn.Linear(10, 12), torch.nn.Linear(7, 12), torch.nn.Linear(7, 12)
    m.o = torch.nn.Linear(12, 10)
    m.fc1, m.fc2 = torch.nn.Linear(10, 16), torch.nn.Linear(16, 10)
    return m


def test_unit_costs_are_computed_from_real_shapes():
    m = _linear_model()
    # 3 heads of 4 dims; q reads 10 features, k/v read 7 (cross-attention), all with bias.
    spec = AttentionSpec(name="a", tower="t", role="cross", in_projs=(InProj("q"), InProj("k"), InProj("v")),
                         out_proj="o", num_heads=3, head_dim=4)
    assert spec.unit_cost(m, "dim") == 3 * ((10 + 1) + (7 + 1) + (7 + 1) + 10)
    assert spec.unit_cost(m, "head") == 4 * ((10 + 1) + (7 + 1) + (7 + 1) + 10)
    mlp = MLPSpec(name="f", tower="t", fc1="fc1", fc2="fc2", width=16)
    assert mlp.unit_cost(m, "dim") == 10 + 1 + 10


def test_self_attention_cost_matches_the_spec_formula(tiny):
    adapter, model = tiny
    for s in adapter.modules(model):
        if s.kind == "attn" and s.role == "self":
            d_in = model.get_submodule(s.out_proj).out_features
            has_bias = any(model.get_submodule(p.name).bias is not None for p in s.in_projs)
            expect = s.num_heads * (3 * d_in + d_in) + (3 * s.num_heads if has_bias else 0)
            assert s.unit_cost(model, "dim") == expect


def test_feature_layout_for_both_granularities():
    spec = AttentionSpec(name="a", tower="t", role="self", in_projs=(InProj("q"),), out_proj="o",
                         num_heads=2, head_dim=3)
    assert spec.feature_index([0, 2], "dim").tolist() == [0, 2, 3, 5]
    assert spec.feature_index([1], "head").tolist() == [3, 4, 5]
    z = torch.tensor([1.0, 0.0, 0.5])
    assert spec.expand_mask(z, "dim").tolist() == [1.0, 0.0, 0.5, 1.0, 0.0, 0.5]
    assert spec.expand_mask(torch.tensor([1.0, 0.0]), "head").tolist() == [1, 1, 1, 0, 0, 0]


def test_fp16_mask_gradients_that_would_overflow_in_fp16_stay_finite():
    from upop.pruning.masks import mask_last_axis

    x = torch.full((4, 3, 5), 300.0, dtype=torch.float16, requires_grad=True)
    m = torch.ones(5, requires_grad=True)
    out = mask_last_axis(x, m)
    assert out.dtype == torch.float16
    out.backward(torch.full_like(out, 300.0))  # 300 · 300 = 90000 > 65504, the largest fp16
    assert m.grad.dtype == torch.float32 and torch.isfinite(m.grad).all()
    assert torch.allclose(m.grad, torch.full((5,), 12 * 90000.0))
    naive = (torch.full((12, 5), 300.0, dtype=torch.float16) * torch.full((12, 5), 300.0, dtype=torch.float16)).sum(0)
    assert not torch.isfinite(naive).all()  # what multiplying in fp16 would have given
    assert torch.equal(x.grad, torch.full_like(x, 300.0))


def test_the_fp32_mask_product_matches_autograd_in_fp32():
    from upop.pruning.masks import mask_last_axis

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 6, generator=g, requires_grad=True)
    m = torch.rand(6, generator=g, requires_grad=True)
    grad = torch.randn(2, 7, 6, generator=g)
    mask_last_axis(x, m).backward(grad)
    x2, m2 = x.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
    (x2 * m2).backward(grad)
    assert torch.allclose(m.grad, m2.grad, atol=1e-6) and torch.allclose(x.grad, x2.grad)
