import dataclasses

import pytest
from typer.testing import CliRunner

import upop
from upop.adapters import get_adapter
from upop.latency.hardware import allowed_sizes, predicted_latency_ms, unit_latency_costs
from upop.profiles import ProfileError, available, load, parse, validate
from upop.pruning.search import UnitTable
from upop_cli.app import app

from ...conftest import FAMILY_CLASSES, IDS, batches_for, build_tiny

SHIPPED = ["a10", "a100", "cpu-x86", "h100", "jetson-orin", "l4", "t4"]


def test_every_shipped_profile_validates():
    assert available() == SHIPPED
    for name in SHIPPED:
        p = load(name)
        assert p.peak_flops > 0 and p.bandwidth > 0 and p.latency_model == "roofline"
    assert load("jetson-orin").tensorrt_major == 10


def test_a_broken_profile_lists_every_error(tmp_path):
    bad = {"name": "x", "runtime": "TPU v4", "device": "cuda", "precision": "fp8", "speed": 3,
           "peaks": {"fp32_tflops": "fast", "memory_gbps": -1},
           "alignment": {"mlp_multiple": 0, "head_dim_min": 64, "head_dim_max": 16, "colour": "red"}}
    errors = validate(bad, "bad.toml")
    joined = "\n".join(errors)
    for expected in ("unknown key 'speed'", "runtime must be a runtime's name", "precision must be one of",
                     "[peaks] missing key 'fp16_tflops'", "[peaks] fp32_tflops must be", "memory_gbps must be > 0",
                     "[alignment] unknown key 'colour'", "mlp_multiple must be >= 1", "head_dim_min is above"):
        assert expected in joined, expected
    with pytest.raises(ProfileError) as exc:
        parse(bad, "bad.toml")
    assert str(exc.value).count("\n") == len(errors)
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nruntime = "tpu"\n')
    r = CliRunner().invoke(app, ["profiles", "validate", str(path)])
    assert r.exit_code == 2 and "runtime must be one of" in r.output and "missing key 'device'" in r.output


def test_profiles_commands():
    r = CliRunner().invoke(app, ["profiles", "list"])
    assert r.exit_code == 0 and "jetson-orin" in r.output
    r = CliRunner().invoke(app, ["profiles", "show", "t4"])
    assert r.exit_code == 0 and '"fp16_tflops": 65.0' in r.output


def _small_profile():
    """Multiples the tiny test models can hold (head_dim 8, MLP 64-96 wide)."""
    p = load("t4")
    return dataclasses.replace(p, alignment=dataclasses.replace(p.alignment, mlp_multiple=16, head_dim_multiple=4,
                                                                 head_dim_min=4))


@pytest.mark.parametrize("family,class_name", FAMILY_CLASSES, ids=IDS)
def test_aligned_search_keeps_multiples_and_meets_the_ratio_within_one_step(family, class_name, monkeypatch):
    prof = _small_profile()
    monkeypatch.setattr("upop.latency.hwprofile.load", lambda name: prof)
    adapter = get_adapter(family)
    model = build_tiny(family, class_name)
    specs = adapter.modules(model)
    cfg = upop.CompressConfig(ratio=0.5, profile="t4", search=upop.SearchConfig(steps=4, update_every=2, lr=1e-4),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=2))
    allowed = allowed_sizes(specs, "dim", prof)
    for s in specs:
        assert len(res.search.kept[s.name]) in allowed[s.name], s.name
    # the budget is a share of latency under the profile, met within the largest aligned step
    costs = unit_latency_costs(build_tiny(family, class_name), adapter, specs, "dim", prof)
    table = UnitTable.build(model, specs, "dim", costs)
    step = max(max(c for c in (costs[s.name] * (b - a) for a, b in zip(allowed[s.name], allowed[s.name][1:]))
                   ) if len(allowed[s.name]) > 1 else 0 for s in specs)
    assert 0.5 - 1e-9 <= res.search.removed_share <= 0.5 + step / table.total_cost + 1e-9
    hw = res.report.hardware
    assert hw["predicted_ms_after"] < hw["predicted_ms_before"]


def test_target_latency_is_met_under_the_profiles_model(monkeypatch):
    prof = _small_profile()
    monkeypatch.setattr("upop.latency.hwprofile.load", lambda name: prof)
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    before = predicted_latency_ms(model, adapter, prof)
    target = 0.6 * before
    cfg = upop.CompressConfig(ratio=0.5, profile="t4", target_latency_ms=target,
                              search=upop.SearchConfig(steps=4, update_every=2), retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=2))
    assert res.report.ratio == pytest.approx(0.4)
    assert res.report.hardware["predicted_ms_after"] <= target * 1.0001
    with pytest.raises(upop.ConfigError, match="already meets"):
        upop.compress(build_tiny("vit", "ViTForImageClassification"),
                      upop.CompressConfig(profile="t4", target_latency_ms=2 * before), batches=[{}])
    with pytest.raises(upop.ConfigError, match="needs a hardware profile"):
        upop.CompressConfig(target_latency_ms=1.0)


def test_whole_heads_profile_needs_head_granularity(monkeypatch):
    prof = load("t4")
    prof = dataclasses.replace(prof, alignment=dataclasses.replace(prof.alignment, whole_heads=True))
    monkeypatch.setattr("upop.latency.hwprofile.load", lambda name: prof)
    model = build_tiny("vit", "ViTForImageClassification")
    with pytest.raises(upop.ConfigError, match="whole heads only"):
        upop.compress(model, upop.CompressConfig(profile="t4"), batches=[{}])


def test_latency_costs_favour_the_tower_that_sees_more_tokens():
    """The point of a latency cost: a vision unit (many tokens) costs more than a text unit (few)."""
    adapter = get_adapter("clip")
    model = build_tiny("clip", "CLIPModel", hidden=32, image_size=64)
    specs = adapter.modules(model)
    costs = unit_latency_costs(model, adapter, specs, "dim", load("t4"))
    vis = [costs[s.name] for s in specs if s.tower == "vision" and s.kind == "mlp"]
    txt = [costs[s.name] for s in specs if s.tower == "text" and s.kind == "mlp"]
    assert min(vis) > max(txt)
