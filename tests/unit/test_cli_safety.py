"""`upop compress` loses nothing: foreign folders, the run state, a full disk, two runs on one output."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import upop
from upop_cli.app import app

from ..conftest import vit_run_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return vit_run_folder(tmp_path_factory.mktemp("safety"))


def _compress(model, data, out, *extra):
    return runner.invoke(app, ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data),
                               "--batch-size", "4", "--search-epochs", "1", "--retrain-epochs", "1",
                               "--out", str(out), "--quiet", *map(str, extra)])


class FakeResult:
    """What upop.compress returns, enough for the CLI: a report and a save that marks its folder."""

    def __init__(self, report=None):
        self.report = report if report is not None else _report(hardware=None)

    def save(self, out, overwrite=False):
        Path(out).mkdir()
        (Path(out) / "upop_manifest.json").write_text("{}")


@pytest.fixture
def no_run(monkeypatch):
    """upop.compress replaced: the calls are recorded, nothing is trained."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        return FakeResult()

    monkeypatch.setattr(upop, "compress", fake)
    return calls


def _one_line(r):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output


def test_a_foreign_state_folder_survives(run_folder, tmp_path, no_run):
    model, data = run_folder
    (tmp_path / "r.partial").mkdir()
    (tmp_path / "r.partial" / "important.txt").write_text("keep")
    r = _compress(model, data, tmp_path / "r")
    _one_line(r)
    assert "r.partial exists and is not a upop run state" in r.output
    assert (tmp_path / "r.partial" / "important.txt").read_text() == "keep"
    assert no_run == [] and not (tmp_path / "r").exists()


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_is_never_the_source_inside_it_or_above_it(run_folder, tmp_path, no_run, where):
    model, data = run_folder
    out = {"same": model, "inside": model / "slim", "parent": model.parent}[where]
    before = sorted(p.name for p in model.iterdir())
    r = _compress(model, data, out, "--overwrite")
    _one_line(r)
    assert "the source" in r.output and no_run == []
    assert sorted(p.name for p in model.iterdir()) == before


def test_no_room_is_said_before_the_run(run_folder, tmp_path, no_run, monkeypatch):
    import shutil
    from collections import namedtuple

    model, data = run_folder
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1 << 30, 1 << 30, 1 << 20))
    r = _compress(model, data, tmp_path / "r")
    _one_line(r)
    assert "has 1 MiB free; this run needs about" in r.output and no_run == []


def test_an_output_under_a_file_is_one_line(run_folder, tmp_path, no_run):
    model, data = run_folder
    (tmp_path / "f").write_text("x")
    r = _compress(model, data, tmp_path / "f" / "r")
    _one_line(r)
    assert "is not a folder" in r.output and no_run == []


def test_a_run_holds_the_lock_and_releases_it(run_folder, tmp_path, monkeypatch):
    model, data = run_folder
    seen = []

    def fake(*args, **kwargs):
        seen.append((tmp_path / "r.lock").read_text().split()[-1])
        return FakeResult()

    monkeypatch.setattr(upop, "compress", fake)
    r = _compress(model, data, tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert seen == [str(os.getpid())] and not (tmp_path / "r.lock").exists()


def test_under_torchrun_only_rank_0_takes_the_lock(run_folder, tmp_path, monkeypatch):
    model, data = run_folder
    seen = []
    monkeypatch.setattr(upop, "compress", lambda *a, **k: seen.append((tmp_path / "r.lock").exists()) or FakeResult())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    r = _compress(model, data, tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert seen == [False] and not (tmp_path / "r").exists()  # rank 1 neither locks nor writes


def test_two_runs_on_one_output_one_is_refused_at_once(run_folder, tmp_path):
    model, data = run_folder
    exe = os.path.join(os.path.dirname(sys.executable), "upop")
    cmd = [exe, "compress", "--model", str(model), "--ratio", "0.5", "--data", str(data), "--batch-size", "4",
           "--search-epochs", "1000", "--retrain-epochs", "1", "--out", str(tmp_path / "r"), "--quiet"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "r.lock").is_file() and time.time() < deadline:
            time.sleep(0.2)
        t0 = time.perf_counter()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"another upop run (pid {first.pid}) is writing" in second.stderr
        assert second.stderr.count("\n") == 1 and time.perf_counter() - t0 < 30
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def _disk_full(monkeypatch):
    def full(self, out, overwrite=False, with_report=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(upop.api.CompressResult, "save", full)


def test_a_full_disk_at_the_final_save_is_one_line(run_folder, tmp_path, monkeypatch):
    model, data = run_folder
    _disk_full(monkeypatch)
    r = _compress(model, data, tmp_path / "r")
    _one_line(r)
    assert f"could not write {tmp_path / 'r'}: No space left on device" in r.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.lock").exists()


def test_a_full_disk_keeps_the_state_and_resume_only_writes(run_folder, tmp_path, monkeypatch):
    model, data = run_folder
    with monkeypatch.context() as m:
        _disk_full(m)
        r = _compress(model, data, tmp_path / "r")
    _one_line(r)
    assert "the run's state is kept in" in r.output and "--resume" in r.output
    assert (tmp_path / "r.partial" / "state.pt").is_file() and (tmp_path / "r.partial" / ".upop-run").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("resume after a failed save must only write")

    monkeypatch.setattr(upop.pipeline, "search", no_training)
    monkeypatch.setattr(upop.pipeline, "retrain", no_training)
    r = _compress(model, data, tmp_path / "r", "--resume")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "upop_manifest.json").is_file() and not (tmp_path / "r.partial").exists()


def test_the_run_state_clears_only_a_folder_with_its_marker(tmp_path):
    from upop.runstate import Baseline, RunState, StateStore

    foreign = tmp_path / "r.partial"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep")
    StateStore(foreign, upop.CompressConfig().to_dict()).clear()
    assert (foreign / "important.txt").read_text() == "keep"
    mine = StateStore(tmp_path / "s.partial", upop.CompressConfig().to_dict())
    mine.save(RunState("search", Baseline(), search={"step": 0}))
    assert (tmp_path / "s.partial" / ".upop-run").is_file()
    mine.clear()
    assert not (tmp_path / "s.partial").exists()


def _latency_report(target, after):
    return _report(hardware={"profile": "t4", "target_ms": target, "predicted_ms_before": 9.0,
                             "predicted_ms_after": after, "target_met": after <= target})


def _report(**fields):
    from upop.report import Report

    base = dict(model="m", family="vit", model_class="ViTForImageClassification", task=None, ratio=0.4,
                granularity="dim", profile="t4", removed_cost_share=0.4, metrics={},
                params={"before": {"total": 10}, "after": {"total": 5}}, flops={"before": {}, "after": {}},
                modules=[], search={"history": []}, retrain={}, seconds=3.0)
    return Report(**{**base, **fields})


def test_a_missed_latency_target_is_said_plainly_and_exits_0(run_folder, tmp_path, monkeypatch):
    from upop_cli.compress_cmd import latency_note

    assert latency_note(_latency_report(2.0, 1.9)) is None
    assert latency_note(_report(hardware=None)) is None
    note = latency_note(_latency_report(2.0, 2.5))
    assert note == "target latency missed: predicted 2.500 ms on t4, target 2 ms (+0.500 ms, +25.0 %)"
    model, data = run_folder
    monkeypatch.setattr(upop, "compress", lambda *a, **k: FakeResult(_latency_report(2.0, 2.5)))
    r = runner.invoke(app, ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data),
                            "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert note in r.output


def test_the_summary_table_says_a_missed_target(tmp_path, capsys):
    from upop_cli.compress_cmd import print_summary

    print_summary(_latency_report(2.0, 2.5), tmp_path)
    assert "target latency missed: predicted 2.500 ms" in capsys.readouterr().out
    print_summary(_latency_report(3.0, 2.5), tmp_path)
    assert "missed" not in capsys.readouterr().out.lower()
