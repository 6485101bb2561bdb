import torch

from upop.pruning.flops import compressible_params, flops_per_tower, params_per_tower
from upop.pruning.slim import slim_model

from ...conftest import batches_for


def test_params_and_flops_per_tower_shrink_after_slimming(tiny):
    adapter, model = tiny
    batch = batches_for(adapter, model, n=1, batch_size=1)[0]
    p0, f0 = params_per_tower(model, adapter), flops_per_tower(model, adapter, batch)
    c0 = compressible_params(model, adapter)
    assert p0["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert f0["total"] > 0 and sum(v for k, v in f0.items() if k != "total") == f0["total"]
    specs = adapter.modules(model)
    slim_model(model, specs, {s.name: list(range(max(1, s.num_units("dim") // 2))) for s in specs}, "dim", adapter)
    p1, f1 = params_per_tower(model, adapter), flops_per_tower(model, adapter, batch)
    assert compressible_params(model, adapter) < c0
    for tower in ("vision",):
        assert p1[tower] < p0[tower] and f1[tower] < f0[tower]


def test_attention_flops_are_counted_even_where_the_model_uses_sdpa():
    """FlopCounterMode misses the CPU SDPA kernel; counting runs on eager attention."""
    from torch.utils.flop_counter import FlopCounterMode

    from upop.adapters import get_adapter

    from ...conftest import build_tiny

    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    model.set_attn_implementation("sdpa")
    batch = batches_for(adapter, model, n=1, batch_size=1)[0]
    ours = flops_per_tower(model, adapter, batch)["total"]
    assert model.config._attn_implementation == "sdpa"  # restored afterwards
    raw = FlopCounterMode(display=False)
    with torch.no_grad(), raw:
        model(**batch)
    cfg = model.config
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    # q·kᵀ and p·v: tokens² × hidden multiply-adds each, per layer, 2 FLOPs per multiply-add.
    attention = cfg.num_hidden_layers * 2 * 2 * tokens * tokens * cfg.hidden_size
    assert ours - raw.get_total_flops() == attention
    assert ours >= attention
