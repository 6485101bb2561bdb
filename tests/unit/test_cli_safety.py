"""`upop compress` loses nothing: foreign folders, the run state, a full disk, two runs on one output."""

import errno
import json
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
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"another upop run (pid {first.pid}) is writing" in second.stderr
        assert second.stderr.count("\n") == 1
        assert first.poll() is None  # refused while the first still runs (no wall-clock bound: CI machines are loaded)
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

    monkeypatch.setattr(upop.run.pipeline, "search", no_training)
    monkeypatch.setattr(upop.run.pipeline, "retrain", no_training)
    r = _compress(model, data, tmp_path / "r", "--resume")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "upop_manifest.json").is_file() and not (tmp_path / "r.partial").exists()


def test_the_run_state_clears_only_a_folder_with_its_marker(tmp_path):
    from upop.run.state import Baseline, RunState, StateStore

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
    from upop.run.report import Report

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


# -- round two: every command that writes goes through the same rule ------------------------------------

def _upop_output(path, kind, **files):
    from upop.run.safety import output_dir

    with output_dir(path, kind) as tmp:
        for name, text in {"x.json": "{}", **files}.items():
            (tmp / name).write_text(text)
    return path


def _nlvr_pth(tmp_path):
    import torch

    path = tmp_path / "nlvr.pth"
    torch.save({"visual_encoder.pos_embed": torch.zeros(1, 5, 48)}, path)
    return path


#: command → (its output kind, argv writing to OUT, whether it has --overwrite)
FOLDER_COMMANDS = {
    "compress": ("slim", lambda m, d, t, out: ["compress", "--model", m, "--ratio", "0.5", "--data", d, "--out", out], True),
    "export": ("export", lambda m, d, t, out: ["export", m, "--out", out], True),
    "convert": ("convert", lambda m, d, t, out: ["convert", "nlvr", str(_nlvr_pth(t)), "--out", out], True),
    "datasets shapes": ("shapes", lambda m, d, t, out: ["datasets", "shapes", "--out", out, "--train", "2"], False),
}


def _run(name, run_folder, tmp_path, out, overwrite=True):
    kind, argv, has_overwrite = FOLDER_COMMANDS[name]
    model, data = run_folder
    return runner.invoke(app, [*argv(str(model), str(data), tmp_path, str(out)),
                               *(["--overwrite"] if overwrite and has_overwrite else [])])


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_link_as_out_is_never_replaced_by_any_command(run_folder, tmp_path, no_run, command):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link2").symlink_to(tmp_path / "empty")
    r = _run(command, run_folder, tmp_path, tmp_path / "link2")
    _one_line(r)
    assert "is a symbolic link; upop never replaces a link" in r.output
    assert (tmp_path / "link2").is_symlink() and not [p for p in tmp_path.iterdir() if ".old" in p.name]


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_a_file_the_user_added_to_an_output_survives_every_command(run_folder, tmp_path, no_run, command):
    out = _upop_output(tmp_path / "o", FOLDER_COMMANDS[command][0])
    (out / "notes.txt").write_text("mine")
    r = _run(command, run_folder, tmp_path, out)
    _one_line(r)
    assert "holds notes.txt, which upop did not write" in r.output and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", list(FOLDER_COMMANDS))
def test_no_command_replaces_another_kind_of_output(run_folder, tmp_path, no_run, command):
    other = "export" if FOLDER_COMMANDS[command][0] != "export" else "slim"
    out = _upop_output(tmp_path / "o", other)
    r = _run(command, run_folder, tmp_path, out)
    _one_line(r)
    assert "one kind of output never replaces another" in r.output and (out / "x.json").is_file()


def test_export_over_a_finished_slim_checkpoint_is_refused(run_folder, tmp_path):
    """The hostile run's case: a compress output (of an older upop: no record) is not replaced by an export."""
    model, _ = run_folder
    slim = tmp_path / "slim"
    slim.mkdir()
    (slim / "upop_manifest.json").write_text("{}")
    (slim / "model.safetensors").write_text("w")
    r = runner.invoke(app, ["export", str(model), "--out", str(slim), "--overwrite"])
    _one_line(r)
    assert "is a upop slim checkpoint and this command writes a export" in r.output
    assert sorted(p.name for p in slim.iterdir()) == ["model.safetensors", "upop_manifest.json"]


def test_out_equal_to_the_teacher_is_refused(run_folder, tmp_path, no_run):
    model, data = run_folder
    teacher = _upop_output(tmp_path / "teacher", "slim", **{"upop_manifest.json": "{}"})
    r = _compress(model, data, teacher, "--overwrite", "--distill", "logits", "--teacher", teacher)
    _one_line(r)
    assert "is the source" in r.output and no_run == [] and (teacher / "upop_manifest.json").is_file()


def test_a_users_lock_file_is_refused_and_kept(run_folder, tmp_path, no_run):
    model, data = run_folder
    (tmp_path / "r.lock").write_text("my lock notes")
    r = _compress(model, data, tmp_path / "r")
    _one_line(r)
    assert "r.lock exists and is not a upop lock" in r.output and no_run == []
    assert (tmp_path / "r.lock").read_text() == "my lock notes"


def test_a_lock_that_links_to_a_users_file_is_never_written(run_folder, tmp_path, no_run):
    model, data = run_folder
    (tmp_path / "precious").write_text("keep")
    (tmp_path / "r.lock").symlink_to(tmp_path / "precious")
    r = _compress(model, data, tmp_path / "r")
    _one_line(r)
    assert (tmp_path / "precious").read_text() == "keep" and (tmp_path / "r.lock").is_symlink()


FILE_COMMANDS = {
    "profile --json": lambda m, out: ["profile", m, "--json", out, "--runs", "1", "--batch", "1"],
    "profiles calibrate": lambda m, out: ["profiles", "calibrate", "--model", m, "--out", out],
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("command", list(FILE_COMMANDS))
def test_a_users_file_is_never_replaced_by_a_file_output(run_folder, tmp_path, monkeypatch, command, overwrite):
    import upop.latency.calibrate
    import upop.exporters.timing

    monkeypatch.setattr(upop.exporters.timing, "profile_torch", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(upop.latency.calibrate, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    model, _ = run_folder
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "results"}')
    r = runner.invoke(app, [*FILE_COMMANDS[command](str(model), str(mine)), *(["--overwrite"] if overwrite else [])])
    _one_line(r)
    assert "exists and is not a" in r.output and "written by upop" in r.output
    assert mine.read_text() == '{"my": "results"}'
    (tmp_path / "l.json").symlink_to(mine)
    r = runner.invoke(app, [*FILE_COMMANDS[command](str(model), str(tmp_path / "l.json")), "--overwrite"])
    _one_line(r)
    assert "symbolic link" in r.output and mine.read_text() == '{"my": "results"}'


def test_profile_json_replaces_its_own_file_only_with_overwrite(run_folder, tmp_path):
    model, _ = run_folder
    res = tmp_path / "sub" / "r.json"  # the missing folder is made
    argv = ["profile", str(model), "--json", str(res), "--runs", "1", "--warmup", "0", "--batch", "1", "--quiet"]
    assert runner.invoke(app, argv).exit_code == 0
    _one_line(runner.invoke(app, argv))
    r = runner.invoke(app, [*argv, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads(res.read_text())["runs"]


def test_calibrate_into_a_missing_folder_makes_it(tmp_path, monkeypatch):
    import dataclasses

    import upop.latency.calibrate
    from upop.profiles import load

    table = {"blocks": [], "rest_ms": 1.0, "granularity": "dim", "device": "cpu"}
    monkeypatch.setattr(upop.latency.calibrate, "calibrate",
                        lambda *a, **k: dataclasses.replace(load("cpu-x86"), latency_model="table", table=table))
    out = tmp_path / "missing" / "p.toml"
    r = runner.invoke(app, ["profiles", "calibrate", "--model", "demo-vit", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_a_foreign_shapes_folder_in_the_cache_is_kept(run_folder, tmp_path, monkeypatch):
    from upop.models.demo import shapes_dir
    from upop.errors import OutputError

    monkeypatch.setenv("UPOP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "shapes-v2").mkdir(parents=True)
    (tmp_path / "cache" / "shapes-v2" / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="not written by upop"):
        shapes_dir()
    assert (tmp_path / "cache" / "shapes-v2" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("cache", ["file", "read-only"])
def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, cache):
    if cache == "file":
        (tmp_path / "c").write_text("x")
    else:  # as on a read-only file system (root writes into a 0500 folder, so the error is raised here)
        import upop.run.safety

        def read_only(final):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(final))

        monkeypatch.setattr(upop.run.safety, "make_temp_dir", read_only)
    monkeypatch.setenv("UPOP_CACHE", str(tmp_path / "c"))
    r = runner.invoke(app, ["eval", "demo-vit", "--limit", "2"])
    _one_line(r)
    assert "cannot write the demo data to upop's cache" in r.output


def test_datasets_shapes_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    shapes_mod = sys.modules["upop.datasets.shapes"]

    def boom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(shapes_mod, "draw", boom)
    r = runner.invoke(app, ["datasets", "shapes", "--out", str(tmp_path / "s"), "--train", "2"])
    assert r.exit_code != 0 and not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    r = runner.invoke(app, ["datasets", "shapes", "--out", str(tmp_path / "s"), "--train", "2", "--val", "2",
                            "--test", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "retrieval_train.json").is_file() and (tmp_path / "s" / ".upop-owned.json").is_file()


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5, 4.0])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(run_folder, tmp_path, delay):
    """From upop's first imports to the middle of the search: never a traceback. (A signal inside the
    interpreter's own start, ~40 ms on an idle machine before any line of upop runs, is Python's to report:
    no code of upop's can catch it, so the earliest moment tried is after it.)"""
    import signal

    model, data = run_folder
    exe = os.path.join(os.path.dirname(sys.executable), "upop")
    proc = subprocess.Popen([exe, "compress", "--model", str(model), "--ratio", "0.5", "--data", str(data),
                             "--batch-size", "4", "--search-epochs", "50", "--out", str(tmp_path / "r"), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == -signal.SIGINT:  # still in Python's own start-up: killed by the signal (a shell says 130)
        assert err == "", err
    else:
        assert proc.returncode == 130, err
        assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.lock").exists()
