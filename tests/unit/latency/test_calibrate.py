import dataclasses

import pytest
import torch
from typer.testing import CliRunner

import upop
from upop.adapters import get_adapter
from upop.latency.calibrate import calibrate, interpolate, to_toml
from upop.latency.hardware import ProfileMismatch, predicted_latency_ms, unit_latency_costs
from upop.profiles import load, read_file
from upop_cli.app import app

from ...conftest import batches_for, build_tiny


def test_interpolation():
    assert interpolate([2, 4], [1.0, 2.0], 3) == 1.5
    assert interpolate([2, 4], [1.0, 2.0], 1) == 0.5  # extended below the sweep
    assert interpolate([2, 4], [1.0, 2.0], 9) == 2.0


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    model = build_tiny("vit", "ViTForImageClassification")
    base = load("cpu-x86")
    base = dataclasses.replace(base, alignment=dataclasses.replace(base.alignment, mlp_multiple=1,
                                                                     head_dim_multiple=1, head_dim_min=1))
    prof = calibrate(model, get_adapter("vit"), base, device=torch.device("cpu"), points=3, warmup=1, runs=3)
    path = tmp_path_factory.mktemp("cal") / "vit.toml"
    path.write_text(to_toml(prof))
    return path


def test_a_calibrated_profile_round_trips_and_drives_the_search(calibrated, tmp_path):
    prof = read_file(calibrated)
    assert prof.latency_model == "table" and prof.table["blocks"] and prof.table["rest_ms"] >= 0
    for b in prof.table["blocks"]:
        assert len(b["widths"]) == len(b["ms"]) >= 2 and b["widths"] == sorted(b["widths"])
    # Timings on a shared CI machine are noisy: the search is checked on the same blocks with
    # monotone times (1 ms per 8 units plus 1 ms), so the assertions do not depend on the clock.
    for b in prof.table["blocks"]:
        b["ms"] = [1.0 + w / 8 for w in b["widths"]]
    prof = dataclasses.replace(prof, table={**prof.table, "rest_ms": 2.0})
    path = tmp_path / "monotone.toml"
    path.write_text(to_toml(prof))
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    costs = unit_latency_costs(model, adapter, adapter.modules(model), "dim", read_file(path))
    assert all(c == pytest.approx(1 / 8 / 1000) for c in costs.values())
    cfg = upop.CompressConfig(ratio=0.5, profile=str(path), search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=1))
    hw = res.report.hardware
    assert hw["latency_model"] == "table" and hw["predicted_ms_after"] < hw["predicted_ms_before"]
    assert predicted_latency_ms(res.model, adapter, read_file(path)) == pytest.approx(hw["predicted_ms_after"])
    # half the units' latency removed: blocks' variable part halves, the 1 ms intercepts and the rest stay
    variable = hw["predicted_ms_before"] - 2.0 - 1.0 * len(adapter.modules(model))
    assert hw["predicted_ms_after"] == pytest.approx(hw["predicted_ms_before"] - 0.5 * variable, rel=0.05)


def test_a_profile_calibrated_for_another_model_is_refused(calibrated):
    adapter = get_adapter("clip")
    model = build_tiny("clip", "CLIPModel")
    with pytest.raises(ProfileMismatch, match="calibrate it for this model"):
        upop.compress(model, upop.CompressConfig(profile=str(calibrated)), batches=batches_for(adapter, model, n=1))


def test_cli_calibrate(tmp_path):
    model = build_tiny("vit", "ViTForImageClassification")
    model.save_pretrained(tmp_path / "m")
    r = CliRunner().invoke(app, ["profiles", "calibrate", "--model", str(tmp_path / "m"), "--out",
                                 str(tmp_path / "p.toml"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert read_file(tmp_path / "p.toml").latency_model == "table"
    r = CliRunner().invoke(app, ["profiles", "calibrate", "--model", str(tmp_path / "m"), "--out",
                                 str(tmp_path / "q.toml"), "--runtime", "ort", "--quiet"])
    assert r.exit_code == 0, r.output
    prof = read_file(tmp_path / "q.toml")
    assert prof.table["runtime"] == "onnxruntime" and all(m > 0 for b in prof.table["blocks"] for m in b["ms"])
    r = CliRunner().invoke(app, ["profiles", "calibrate", "--model", str(tmp_path / "m"), "--out",
                                 str(tmp_path / "t.toml"), "--runtime", "trt"])
    assert r.exit_code == 2 and ("TensorRT" in r.output or "NVIDIA" in r.output)


def test_a_latency_target_under_a_calibrated_profile_lands_within_one_aligned_step(calibrated, tmp_path):
    """The target is a share of the *compressible* latency (the units' slopes), not of the total, which holds
    the blocks' intercepts and the rest of the model: with the total, a table profile misses its target."""
    prof = read_file(calibrated)
    for b in prof.table["blocks"]:
        b["ms"] = [1.0 + w / 8 for w in b["widths"]]
    path = tmp_path / "monotone.toml"
    path.write_text(to_toml(dataclasses.replace(prof, table={**prof.table, "rest_ms": 2.0})))
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    before = predicted_latency_ms(model, adapter, read_file(path))
    variable = before - 2.0 - 1.0 * len(adapter.modules(model))
    target = before - 0.3 * variable
    cfg = upop.CompressConfig(ratio=0.5, profile=str(path), target_latency_ms=target,
                              search=upop.SearchConfig(steps=2, update_every=1), retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=1))
    one_step = 1 / 8  # every size is allowed (multiples of 1): one unit of 1/8 ms
    assert res.report.ratio == pytest.approx(0.3)
    assert target - one_step - 1e-9 <= res.report.hardware["predicted_ms_after"] <= target + 1e-9
    assert res.report.hardware["target_met"] is True


def test_nlvr_vision_runs_as_a_batch_of_two_images_not_one_sequence_of_twice_the_tokens(monkeypatch):
    adapter = get_adapter("blip_nlvr")
    model = build_tiny("blip_nlvr", "BlipNlvrForVisualReasoning")
    specs = adapter.modules(model)
    t4 = load("t4")
    costs = unit_latency_costs(model, adapter, specs, "dim", t4)
    monkeypatch.setattr(type(adapter), "module_items", lambda self, m, s: 1)
    twice = dataclasses.replace(t4, shapes=dataclasses.replace(t4.shapes, batch=2 * t4.shapes.batch))
    as_batch_of_two = unit_latency_costs(model, adapter, specs, "dim", twice)
    single = unit_latency_costs(model, adapter, specs, "dim", t4)
    for s in specs:
        expected = as_batch_of_two[s.name] if s.tower == "vision" else single[s.name]
        assert costs[s.name] == pytest.approx(expected), s.name
