import math

import pytest
import torch

from upop.pruning.masks import MaskSet
from upop.pruning.slim import slim_model

from ...conftest import FAMILY_CLASSES, IDS, batches_for, build_tiny
from upop.adapters import get_adapter


def _random_kept(masks, seed=0):
    """Different sizes in every module; the first module keeps a single unit."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for i, (spec, z) in enumerate(masks.items()):
        n = z.numel()
        k = 1 if i == 0 else int(torch.randint(1, n + 1, (1,), generator=g))
        kept[spec.name] = sorted(torch.randperm(n, generator=g)[:k].tolist())
    return kept


def _set_masks(masks, kept, values=None):
    with torch.no_grad():
        for spec, z in masks.items():
            z.zero_()
            idx = kept[spec.name]
            z[idx] = 1.0 if values is None else torch.tensor([values[spec.name][i] for i in idx])


@pytest.mark.parametrize("gran", ["dim", "head"])
@pytest.mark.parametrize("family,class_name", FAMILY_CLASSES, ids=IDS)
def test_masked_model_equals_slim_model(family, class_name, gran):
    adapter = get_adapter(family)
    model = build_tiny(family, class_name)
    specs = adapter.modules(model)
    batch = batches_for(adapter, model, n=1)[0]
    masks = MaskSet(model, specs, gran)
    kept = _random_kept(masks)
    _set_masks(masks, kept)
    with torch.no_grad():
        masked = adapter.forward_outputs(model, batch)
    masks.remove()
    slim_model(model, specs, kept, gran, adapter)
    with torch.no_grad():
        slim = adapter.forward_outputs(model, batch)
    for k in masked:
        assert (masked[k] - slim[k]).abs().max() <= 1e-5, k
    sizes = {len(v) for v in kept.values()}
    assert len(sizes) >= 2  # the modules really ended up with different sizes
    # The slim model's own description matches what was kept.
    for s in adapter.modules(model):
        assert s.num_units(gran) == len(kept[s.name])


@pytest.mark.parametrize("family,class_name", FAMILY_CLASSES, ids=IDS)
def test_non_binary_masks_are_folded_into_the_weights(family, class_name):
    adapter = get_adapter(family)
    model = build_tiny(family, class_name)
    specs = adapter.modules(model)
    batch = batches_for(adapter, model, n=1)[0]
    masks = MaskSet(model, specs, "dim")
    kept = _random_kept(masks, seed=1)
    g = torch.Generator().manual_seed(5)
    values = {s.name: (0.3 + 0.7 * torch.rand(z.numel(), generator=g)).tolist() for s, z in masks.items()}
    _set_masks(masks, kept, values)
    with torch.no_grad():
        masked = adapter.forward_outputs(model, batch)
    masks.remove()
    slim_model(model, specs, kept, "dim", adapter, zeta=values)
    with torch.no_grad():
        slim = adapter.forward_outputs(model, batch)
    for k in masked:
        assert (masked[k] - slim[k]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("class_name", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
@pytest.mark.parametrize("gran", ["dim", "head"])
def test_generate_gives_the_same_tokens(class_name, gran):
    adapter = get_adapter("blip")
    model = build_tiny("blip", class_name)
    specs = adapter.modules(model)
    batch = batches_for(adapter, model, n=1, batch_size=3)[0]
    gen_kwargs = dict(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"][:, :4],
                      max_new_tokens=6, do_sample=False, num_beams=1)
    masks = MaskSet(model, specs, gran)
    kept = _random_kept(masks, seed=2)
    _set_masks(masks, kept)
    with torch.no_grad():
        masked = model.generate(**gen_kwargs)
    masks.remove()
    slim_model(model, specs, kept, gran, adapter)
    with torch.no_grad():
        slim = model.generate(**gen_kwargs)
    assert masked.shape[1] > 4
    assert torch.equal(masked, slim)


@pytest.mark.parametrize("family,class_name", FAMILY_CLASSES, ids=IDS)
def test_qkv_biases_of_kept_units_survive_slimming(family, class_name):
    """Regression for the reference code, which assigned the ViT qkv bias to ``weight.bias``."""
    adapter = get_adapter(family)
    model = build_tiny(family, class_name)
    specs = adapter.modules(model)
    spec = next(s for s in specs if s.kind == "attn")
    kept = {s.name: list(range(0, s.num_units("dim"), 2)) for s in specs}
    proj = spec.in_projs[0]
    lin = model.get_submodule(proj.name)
    feat = spec.feature_index(kept[spec.name], "dim")
    width = spec.num_heads * spec.head_dim
    idx = torch.cat([feat + s * width for s in range(proj.segments)])
    expected_bias = lin.bias.detach()[idx].clone()
    expected_w = lin.weight.detach()[idx].clone()
    slim_model(model, specs, kept, "dim", adapter)
    lin = model.get_submodule(proj.name)
    if "query" in proj.name and spec.head_dim != len(kept[spec.name]):
        # BLIP text folds the sqrt(new/old) scale correction into the query rows.
        factor = math.sqrt(len(kept[spec.name]) / spec.head_dim)
        expected_bias, expected_w = expected_bias * factor, expected_w * factor
    assert torch.allclose(lin.bias, expected_bias, atol=1e-7)
    assert torch.allclose(lin.weight, expected_w, atol=1e-7)


# BLIP text attentions have no scale attribute: slimming folds the scale into the query rows (tested below).
@pytest.mark.parametrize("family,class_name", [fc for fc in FAMILY_CLASSES if not fc[0].startswith("blip")],
                         ids=[c for f, c in FAMILY_CLASSES if not f.startswith("blip")])
def test_attention_scale_is_kept(family, class_name):
    adapter = get_adapter(family)
    model = build_tiny(family, class_name)
    specs = adapter.modules(model)
    scales = {s.name: getattr(model.get_submodule(s.name), "scale", None) or model.get_submodule(s.name).scaling
              for s in specs if s.kind == "attn"}
    slim_model(model, specs, {s.name: [0, 1] for s in specs}, "dim", adapter)
    for name, scale in scales.items():
        mod = model.get_submodule(name)
        assert (getattr(mod, "scale", None) or mod.scaling) == scale
        assert mod.head_dim == 2


def test_slimming_refuses_to_empty_a_module():
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    specs = adapter.modules(model)
    kept = {s.name: [0] for s in specs}
    kept[specs[0].name] = []
    with pytest.raises(ValueError, match="keeps no unit|keep no unit"):
        slim_model(model, specs, kept, "dim", adapter)
