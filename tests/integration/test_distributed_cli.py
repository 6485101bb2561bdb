"""torchrun through the CLI on CPU (gloo): `--nproc`, kill -9 mid-search and mid-retrain then
`--resume`, an elastic restart after a worker is killed, and the launch errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from upop.pruning.search import pi_schedule

from ..conftest import vit_run_folder

EXE = os.path.join(os.path.dirname(sys.executable), "upop")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return vit_run_folder(tmp_path_factory.mktemp("dist"))


def _cmd(setup, out: Path, *extra: str) -> list[str]:
    model, data = setup
    return [EXE, "compress", "--model", str(model), "--ratio", "0.5", "--data", str(data), "--out", str(out),
            "--lr", "1e-3", "--device", "cpu", "--quiet", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _kept(out: Path) -> dict:
    return json.loads((out / "upop_manifest.json").read_text())["stages"][-1]["kept"]


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _wait_for_state(partial: Path, proc: subprocess.Popen, ready, timeout: float = 240) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the checkpoint: {proc.stderr.read() if proc.stderr else ''}")
        try:
            state = torch.load(partial / "state.pt", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            state = None
        if state is not None and ready(state):
            return state
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _kill_all(proc: subprocess.Popen) -> None:
    for p in _tree(proc.pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _assert_whole_search(report: dict) -> None:
    hist = report["search"]["history"]
    total = report["search"]["steps"]
    assert [int(h["step"]) for h in hist] == list(range(1, total + 1))  # every step once, none repeated
    assert hist[-1]["pi"] == pytest.approx(0.5)
    pis = [h["pi"] for h in hist]
    assert pis == sorted(pis)
    assert all(any(p == pytest.approx(pi_schedule(s, total, 0.5)) for s in range(total + 1)) for p in pis)


def test_torchrun_with_one_process_joins_a_group_and_selects_what_no_group_selects(setup, tmp_path):
    """Under torchrun even one process joins the process group, so every collective goes through the backend:
    a one-GPU machine checks the NCCL paths this way. The run selects and scores as the one without a group."""
    common = ("--batch-size", "8", "--search-epochs", "2", "--retrain-epochs", "1")
    alone = subprocess.run(_cmd(setup, tmp_path / "alone", *common), capture_output=True, text=True, timeout=600,
                           env=_env())
    assert alone.returncode == 0, alone.stderr
    cmd = _cmd(setup, tmp_path / "group", *common)
    group = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                            "--module", "upop_cli", *cmd[1:]], capture_output=True, text=True, timeout=600, env=_env())
    assert group.returncode == 0, group.stderr
    assert _report(tmp_path / "group")["distributed"] == {"world_size": 1, "per_rank_batch": 8, "grad_accum": 1,
                                                          "effective_batch": 8, "backend": "gloo"}
    assert _report(tmp_path / "alone")["distributed"]["backend"] is None
    assert _kept(tmp_path / "group") == _kept(tmp_path / "alone")
    after = [_report(tmp_path / name)["metrics"]["after"]["top1"] for name in ("group", "alone")]
    assert after[0] == pytest.approx(after[1])


def test_nproc_two_selects_what_one_process_with_the_whole_batch_selects(setup, tmp_path):
    common = ("--search-epochs", "4", "--retrain-epochs", "1")
    one = subprocess.run(_cmd(setup, tmp_path / "one", "--batch-size", "8", *common), capture_output=True,
                         text=True, timeout=600, env=_env())
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_cmd(setup, tmp_path / "two", "--batch-size", "4", "--nproc", "2", *common),
                         capture_output=True, text=True, timeout=600, env=_env())
    assert two.returncode == 0, two.stderr
    assert "Traceback" not in two.stderr
    assert _kept(tmp_path / "two") == _kept(tmp_path / "one")
    r1, r2 = _report(tmp_path / "one"), _report(tmp_path / "two")
    assert r2["distributed"] == {"world_size": 2, "per_rank_batch": 4, "grad_accum": 1, "effective_batch": 8,
                                 "backend": "gloo"}
    assert r1["distributed"]["effective_batch"] == 8
    assert r2["metrics"]["after"]["top1"] == pytest.approx(r1["metrics"]["after"]["top1"])
    assert "effective batch 8" in (tmp_path / "two" / "report.md").read_text()
    assert not list(tmp_path.glob("*.partial"))


def test_kill_9_mid_search_under_torchrun_then_resume(setup, tmp_path):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = _cmd(setup, out, "--batch-size", "4", "--nproc", "2", "--search-epochs", "60", "--retrain-epochs", "1",
               "--checkpoint-every", "3")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    state = _wait_for_state(partial, proc, lambda s: s["phase"] == "search" and s["search"]["step"] >= 6)
    _kill_all(proc)
    stopped_at = int(state["search"]["step"])
    assert stopped_at < int(state["search"]["total"])
    assert len(state["search"]["rng"]) == 2  # every rank's RNG
    assert not out.exists()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr
    report = _report(out)
    assert report["resumed_from"]["phase"] == "search" and report["resumed_from"]["step"] >= stopped_at
    _assert_whole_search(report)
    assert not partial.exists()


def test_kill_9_mid_retrain_then_resume(setup, tmp_path):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = _cmd(setup, out, "--batch-size", "8", "--search-epochs", "2", "--retrain-epochs", "40",
               "--checkpoint-every", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    state = _wait_for_state(partial, proc, lambda s: s["phase"] == "retrain" and s.get("retrain") is not None
                            and s["retrain"]["step"] >= 4)
    _kill_all(proc)
    stopped_at = int(state["retrain"]["step"])
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr
    report = _report(out)
    assert report["resumed_from"]["phase"] == "retrain" and report["resumed_from"]["step"] >= stopped_at
    steps = [int(h["step"]) for h in report["retrain"]["history"]]
    assert steps == list(range(1, 40 * 3 + 1))  # 24 images / 8 = 3 steps per epoch, each step once
    assert [int(e["epoch"]) for e in report["retrain"]["evals"]] == list(range(0, 41))
    _assert_whole_search(report)


def test_elastic_restart_after_a_worker_is_killed(setup, tmp_path):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = _cmd(setup, out, "--batch-size", "4", "--nproc", "2", "--max-restarts", "1", "--search-epochs", "60",
               "--retrain-epochs", "1", "--checkpoint-every", "3")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_state(partial, proc, lambda s: s["phase"] == "search" and s["search"]["step"] >= 6)
    workers = [p for p in _tree(proc.pid) if b"RANK=1\0" in _environ(p)]
    assert workers
    os.kill(workers[0], signal.SIGKILL)  # one worker dies; torchrun restarts the group
    _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    report = _report(out)
    assert report["resumed_from"] is not None and report["resumed_from"]["phase"] == "search"
    _assert_whole_search(report)


def _environ(pid: int) -> bytes:
    try:
        return b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("extra,message", [
    (("--nnodes", "2"), "--rdzv-endpoint"),
    (("--checkpoint-every", "-1"), "--checkpoint-every"),
])
def test_launch_errors_are_one_line(setup, tmp_path, extra, message):
    res = subprocess.run(_cmd(setup, tmp_path / "o", "--search-epochs", "1", "--retrain-epochs", "0", *extra),
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_resume_with_another_process_count_is_refused(setup, tmp_path):
    out = tmp_path / "out"
    cmd = _cmd(setup, out, "--batch-size", "4", "--search-epochs", "60", "--retrain-epochs", "1",
               "--checkpoint-every", "3")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_state(tmp_path / "out.partial", proc, lambda s: s["phase"] == "search")
    _kill_all(proc)
    res = subprocess.run(cmd + ["--resume", "--nproc", "2"], capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 2
    assert "1 processes" in res.stderr and "--nproc" in res.stderr


def test_two_nodes_through_the_rendezvous_arguments(setup, tmp_path):
    """Two launchers, as on two machines, meet at a c10d rendezvous and run one 2-rank job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = _cmd(setup, out, "--batch-size", "4", "--search-epochs", "2", "--retrain-epochs", "1", "--nnodes", "2",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes")
    nodes = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    for p in nodes:
        _o, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    report = _report(out)  # written once, by global rank 0
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["effective_batch"] == 8


def test_ctrl_c_to_the_launcher_stops_every_rank_with_one_message(setup, tmp_path):
    out = tmp_path / "out"
    cmd = _cmd(setup, out, "--batch-size", "4", "--nproc", "2", "--search-epochs", "60", "--retrain-epochs", "1",
               "--checkpoint-every", "3")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_state(tmp_path / "out.partial", proc, lambda s: s["phase"] == "search")
    proc.send_signal(signal.SIGINT)
    _o, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "--resume" in err
    assert not out.exists() and (tmp_path / "out.partial" / "state.pt").is_file()
