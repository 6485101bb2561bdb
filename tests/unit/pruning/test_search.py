import math

import pytest
import torch

from upop.run.config import SearchConfig
from upop.pruning.search import UnitTable, pi_schedule, search, select_units, unified_scores
from upop.pruning.units import AttentionSpec, InProj, MLPSpec

from ...conftest import batches_for, build_tiny


def test_schedule_reaches_p_exactly_and_is_monotone():
    p, T = 0.37, 123
    values = [pi_schedule(t, T, p) for t in range(T + 1)]
    assert values[0] == 0.0
    assert values[-1] == p
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert math.isclose(pi_schedule(T // 2, T, p), p * math.sqrt((1 - math.cos(math.pi * (T // 2) / T)) / 2))


def _run(adapter, model, ratio, gran="dim", steps=6, every=2, seed=0, **kw):
    batches = batches_for(adapter, model, n=3)
    cfg = SearchConfig(ratio=ratio, granularity=gran, steps=steps, update_every=every, lr=1e-4, seed=seed, **kw)
    return search(model, adapter.modules(model), adapter.native_loss, batches, cfg)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_removed_share_equals_ratio_within_the_largest_unit(tiny, ratio):
    adapter, model = tiny
    specs = adapter.modules(model)
    for gran in ("dim", "head"):
        res = _run(adapter, model, ratio, gran)
        table = UnitTable.build(model, specs, gran)
        largest = float(table.cost.max()) / table.total_cost
        # Every module keeps one unit: with 4 heads a module can lose at most 3/4 of its cost.
        target = min(ratio, res.max_share)
        assert target - 1e-9 <= res.removed_share <= target + largest, (gran, res.removed_share)
        assert all(len(k) >= 1 for k in res.kept.values())


def test_marked_units_end_at_exactly_zero_and_others_at_one(tiny):
    adapter, model = tiny
    res = _run(adapter, model, 0.5)
    for name, z in res.zeta.items():
        kept = set(res.kept[name])
        for i, v in enumerate(z):
            assert v == (1.0 if i in kept else 0.0)
    assert res.history[-1]["pi"] == 0.5


def test_intermediate_updates_follow_the_schedule(tiny):
    adapter, model = tiny
    res = _run(adapter, model, 0.6, steps=8, every=4)
    pis = [h["pi"] for h in res.history]
    assert pis[3] == pytest.approx(pi_schedule(4, 8, 0.6)) and pis[7] == 0.6
    assert pis[0] == 0.0  # no update before the first K steps


def test_search_is_deterministic_under_a_seed():
    from upop.adapters import get_adapter

    adapter = get_adapter("blip")
    results = []
    for _ in range(2):
        model = build_tiny("blip", "BlipForImageTextRetrieval")
        results.append(_run(adapter, model, 0.5, seed=3))
    assert results[0].kept == results[1].kept
    assert results[0].importance == results[1].importance


def test_sparsity_term_does_not_change_the_ranking():
    """λ·Σ|ζ| adds the same constant to every unit's gradient; after the z-score it is inert (docs/method.md)."""
    from upop.adapters import get_adapter

    adapter = get_adapter("vit")
    with_l = _run(adapter, build_tiny("vit", "ViTForImageClassification"), 0.5, lambda_attn=0.5, lambda_mlp=0.1)
    without = _run(adapter, build_tiny("vit", "ViTForImageClassification"), 0.5, lambda_attn=0.0, lambda_mlp=0.0)
    assert with_l.kept == without.kept
    # The raw importances do differ: the term is there, it just cannot reorder units.
    name = next(iter(with_l.importance))
    assert with_l.importance[name] != without.importance[name]


def _toy_table():
    m = torch.nn.Module()
    m.q, m.k, m.v, m.o = (torch.nn.Linear(4, 4, bias=False) for _ in range(4))
    m.fc1, m.fc2 = torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 4, bias=False)
    attn = AttentionSpec(name="a", tower="vision", role="self",
                         in_projs=(InProj("q"), InProj("k"), InProj("v")), out_proj="o", num_heads=2, head_dim=2)
    mlp = MLPSpec(name="f", tower="text", fc1="fc1", fc2="fc2", width=3)
    return m, [attn, mlp]


def test_unified_ranking_zscores_each_type_separately():
    m, specs = _toy_table()
    table = UnitTable.build(m, specs, "dim")
    imp = torch.tensor([100.0, 300.0, 1.0, 2.0, 3.0])  # attention grads are on a much larger scale
    scores = unified_scores(imp, table)
    r = 2 ** -0.5
    assert scores.tolist() == pytest.approx([-r, r, -1.0, 0.0, 1.0])
    # The largest MLP gradient outranks the largest attention one, though it is 100x smaller.
    assert int(torch.argmax(scores)) == 4


def test_threshold_walks_costs_and_keeps_one_unit_per_module():
    m, specs = _toy_table()
    table = UnitTable.build(m, specs, "dim")
    # attention unit cost: 2 heads × (3·4 + 4) = 32; MLP unit: 4 + 4 = 8; total 2·32 + 3·8 = 88
    assert table.cost.tolist() == [32, 32, 8, 8, 8]
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    # 30% of 88 = 26.4 -> the first attention unit (32) already reaches it.
    assert select_units(scores, table, 0.3).tolist() == [True, False, False, False, False]
    # 90% = 79.2: the second attention unit would empty module "a" and is skipped; all but one MLP unit too.
    marked = select_units(scores, table, 0.9)
    assert marked.tolist() == [True, False, True, True, False]


def test_custom_unit_costs_change_the_budget():
    m, specs = _toy_table()
    table = UnitTable.build(m, specs, "dim", unit_costs={"a": 1.0, "f": [10.0, 10.0, 10.0]})
    assert table.cost.tolist() == [1, 1, 10, 10, 10]


def test_search_trains_the_model_but_never_steps_the_masks(tiny):
    adapter, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(adapter, model, 0.3)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the search trains the model's weights"


def test_unified_once_applies_the_mask_only_at_the_end():
    from upop.adapters import get_adapter

    adapter = get_adapter("vit")
    res = _run(adapter, build_tiny("vit", "ViTForImageClassification"), 0.5, steps=6, every=2, method="unified-once")
    assert [h["pi"] for h in res.history[:-1]] == [0.0] * 5 and res.history[-1]["pi"] == 0.5
    assert 0.5 <= res.removed_share


def test_uniform_magnitude_removes_the_same_share_of_every_module():
    from upop.adapters import get_adapter

    adapter = get_adapter("clip")
    model = build_tiny("clip", "CLIPModel")
    with torch.no_grad():  # make unit 0 of every MLP the smallest: it must be the first to go
        for s in adapter.modules(model):
            if s.kind == "mlp":
                model.get_submodule(s.fc1).weight[0].mul_(1e-3)
                model.get_submodule(s.fc2).weight[:, 0].mul_(1e-3)
    res = _run(adapter, model, 0.5, method="uniform-magnitude")
    for s in adapter.modules(model):
        n = s.num_units("dim")
        assert len(res.kept[s.name]) == n - round(0.5 * n)
        if s.kind == "mlp":
            assert 0 not in res.kept[s.name]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_search_lr_is_constant_by_default_and_cosine_on_request(tiny, schedule):
    adapter, model = tiny
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def spy(opt, *a, **kw):
        seen.append(opt.param_groups[0]["lr"])
        return step(opt, *a, **kw)

    kw = {} if schedule == "constant" else {"lr_schedule": "cosine"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        _run(adapter, model, 0.5, steps=6, every=2, **kw)
    assert len(seen) == 6
    if schedule == "constant":
        assert SearchConfig().lr_schedule == "constant"
        assert seen == [1e-4] * 6
    else:
        assert seen == pytest.approx([1e-4 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)])


def test_unknown_lr_schedule_is_refused():
    from upop.errors import ConfigError

    with pytest.raises(ConfigError, match="lr schedule"):
        SearchConfig(lr_schedule="linear").validate()


def _reference_pruned(scores_attn: torch.Tensor, scores_mlp: torch.Tensor, attn_weight: float, pi: float) -> torch.Tensor:
    """The reference's update_alpha_parameters (compress_retrieval.py): z-score each type, sort all units
    descending, weigh an attention unit ``attn_weight`` and an MLP unit 1, take the threshold where the weighted
    cumulative sum is nearest π of the total, and push the units above it (bool over [attention, MLP] units)."""
    standarlization = lambda x: (x - torch.mean(x)) / torch.std(x)  # noqa: E731
    alpha_grad = torch.cat([standarlization(scores_attn).view(-1), standarlization(scores_mlp).view(-1)])
    sorted_alpha_grad, indices = torch.sort(alpha_grad, descending=True)
    compression_weight = torch.ones_like(indices, dtype=torch.float64)
    compression_weight[indices < scores_attn.numel()] = attn_weight
    threshold = sorted_alpha_grad[torch.argmin(torch.abs(torch.cumsum(compression_weight, 0)
                                                          - torch.sum(compression_weight) * pi))]
    return ~(alpha_grad <= threshold)


@pytest.mark.parametrize("family,class_name,weight", [("blip", "BlipForImageTextRetrieval", 36.0),
                                                      ("clip", "CLIPModel", 36.0), ("deit", "DeiTForImageClassification",
                                                                                   12.0)])
def test_paper_cost_weights_weigh_units_as_the_reference(family, class_name, weight):
    from upop.adapters import get_adapter
    from upop.pruning.search import paper_unit_costs

    adapter = get_adapter(family)
    model = build_tiny(family, class_name)
    specs = adapter.modules(model)
    costs = paper_unit_costs(specs, "dim", adapter.paper_attn_weight)
    table = UnitTable.build(model, specs, "dim", costs)
    assert set(table.cost[table.is_attn].tolist()) == {weight} and set(table.cost[~table.is_attn].tolist()) == {1.0}
    g = torch.Generator().manual_seed(0)
    importance = torch.randn(table.cost.numel(), generator=g, dtype=torch.float64)
    # the reference lists the attention units before the MLP units: the same ranking, reordered
    order = torch.cat([torch.nonzero(table.is_attn).flatten(), torch.nonzero(~table.is_attn).flatten()])
    for pi in (0.1, 0.3, 0.5):
        ours = select_units(unified_scores(importance, table), table, pi)[order]
        ref = _reference_pruned(importance[table.is_attn], importance[~table.is_attn], weight, pi)
        # the reference's threshold is the unit whose cumulative weight is nearest π (the one before or the one
        # where it crosses) and it keeps that unit; ours marks through the crossing unit: the same ranking and
        # weights, ours the reference's set plus at most those two units
        assert bool((ours | ~ref).all()) and int((ours & ~ref).sum()) <= 2, pi
    head = paper_unit_costs(specs, "head", weight)
    attn = next(s for s in specs if s.kind == "attn")
    assert head[attn.name] == weight * attn.head_dim


def test_paper_cost_weights_in_the_search_and_where_they_do_not_apply():
    from upop.adapters import get_adapter
    from upop.errors import ConfigError

    adapter = get_adapter("blip")
    model = build_tiny("blip", "BlipForImageTextRetrieval")
    cfg = SearchConfig(ratio=0.5, steps=2, update_every=1, lr=1e-4, cost_weights="paper")
    res = search(model, adapter.modules(model), adapter.native_loss, batches_for(adapter, model, n=2), cfg)
    table = UnitTable.build(model, adapter.modules(model), "dim",
                            {s.name: 36.0 if s.kind == "attn" else 1.0 for s in adapter.modules(model)})
    removed = sum(float(table.cost[table.offsets[i] + j]) for i, s in enumerate(table.specs)
                  for j in range(s.num_units("dim")) if j not in res.kept[s.name])
    assert res.removed_share == pytest.approx(removed / table.total_cost)  # the share counted in the paper's weights
    with pytest.raises(ConfigError, match="a hardware profile weighs them by latency"):
        search(model, adapter.modules(model), adapter.native_loss, batches_for(adapter, model), cfg,
               unit_costs={s.name: 1.0 for s in adapter.modules(model)})
    vit = build_tiny("vit", "ViTForImageClassification")
    with pytest.raises(ConfigError, match="no attention:MLP weighting for vit"):
        search(vit, get_adapter("vit").modules(vit), get_adapter("vit").native_loss, batches_for(get_adapter("vit"), vit),
               cfg)
    with pytest.raises(ConfigError, match="cost weights must be one of true, paper"):
        SearchConfig(cost_weights="flops").validate()
