"""Measured latency in every compress report."""

import pytest
import torch

import upop
from upop.latency import measure
from upop.adapters import get_adapter
from upop.run.report import summary_rows

from ...conftest import batches_for, build_tiny


def _compress(**kw):
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    return upop.compress(model, cfg, batches=batches_for(adapter, model, n=2, batch_size=3), **kw)


def test_the_report_has_measured_latency_of_both_models():
    rows = _compress().report.latency
    assert {(r["runtime"], r["batch"]) for r in rows} == {("torch", 1), ("torch", 3)}  # batch 1 and the training batch
    for r in rows:
        assert r["device"] == "cpu" and r["before_ms"] > 0 and r["after_ms"] > 0
        assert r["before_p90_ms"] >= r["before_ms"] and r["after_p90_ms"] >= r["after_ms"]
        assert r["speedup"] == pytest.approx(r["before_ms"] / r["after_ms"])


def test_other_runtimes_come_as_timers_and_latency_can_be_skipped():
    prepared = []

    def prepare(model, inputs):
        prepared.append(next(iter(inputs.values())).shape[0])
        return lambda: None

    report = _compress(latency={"fake": measure.Runtime(prepare)}).report
    fake_rows = [r for r in report.latency if r["runtime"] == "fake"]
    assert len(fake_rows) == 2 and all(r["after_ms"] >= 0 for r in fake_rows)
    assert prepared == [1, 3, 1, 3]  # prepared once per model and batch: before, then after
    assert any("latency ms, fake" in row[0] for row in summary_rows(report))
    assert _compress(latency=False).report.latency is None


def test_enough_runs_for_the_budget_within_bounds(monkeypatch):
    monkeypatch.setattr(measure, "BUDGET_S", 0.5)
    assert measure._runs_for(100.0) == measure.RUNS[0]  # slow: the minimum
    assert measure._runs_for(0.01) == measure.RUNS[1]  # fast: the maximum
    assert measure._runs_for(20.0) == 25


def test_time_model_leaves_the_model_in_its_mode():
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification").train()
    out = measure.time_model(model, adapter, 2, torch.device("cpu"), measure.torch_runtime(torch.device("cpu")))
    assert model.training and out["p50_ms"] > 0 and out["runs"] >= measure.RUNS[0]


def test_onnx_runtime_measures_the_exported_forward():
    pytest.importorskip("onnxruntime")
    from upop.exporters.timing import ort_runtime

    report = _compress(latency={"onnxruntime": ort_runtime(torch.device("cpu"))}).report
    ort_rows = [r for r in report.latency if r["runtime"] == "onnxruntime"]
    assert {r["batch"] for r in ort_rows} == {1, 3} and all(r["before_ms"] > 0 and r["after_ms"] > 0 for r in ort_rows)


def test_only_rank_0_measures_latency():
    """The report is rank 0's; other ranks timing at the same time would share the machine and skew it."""
    from types import SimpleNamespace

    from upop.training.distributed import Dist
    from upop.run.pipeline import measure_latency

    def prepare(model, inputs):
        raise AssertionError("rank 1 timed the model")

    run = SimpleNamespace(latency_runtimes={"torch": measure.Runtime(prepare)}, dist=Dist(rank=1, world=2),
                          device=torch.device("cpu"), latency_batch=2, timings={})
    assert measure_latency(run, None, None) is None
