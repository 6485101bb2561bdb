"""Ctrl-C leaves a resumable state; resuming finishes with the same result as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import upop
from upop.adapters import get_adapter

from ...conftest import batches_for, build_tiny, vit_run_folder


def _config():
    return upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=8, update_every=2, lr=1e-3),
                               retrain=upop.RetrainConfig(epochs=2, steps_per_epoch=3, lr=1e-3))


class InterruptAt:
    """A loss that raises KeyboardInterrupt on its n-th call (as Ctrl-C would between steps)."""

    def __init__(self, adapter, n):
        self.adapter, self.n, self.calls = adapter, n, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.adapter.native_loss(model, batch)


@pytest.mark.parametrize("interrupt_at", [5, 11], ids=["mid-search", "mid-retrain"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, interrupt_at):
    adapter = get_adapter("vit")
    evals = lambda m: -float(adapter.native_loss(m.eval(), batches_for(adapter, m, n=1, seed=5)[0]))  # noqa: E731
    ref = upop.compress(build_tiny("vit", "ViTForImageClassification"), _config(),
                        batches=batches_for(adapter, build_tiny("vit", "ViTForImageClassification"), n=3),
                        eval_fn=lambda m: float(torch.no_grad()(evals)(m)))
    model = build_tiny("vit", "ViTForImageClassification")
    batches = batches_for(adapter, model, n=3)
    state = tmp_path / "run.partial"
    with pytest.raises(KeyboardInterrupt):
        upop.compress(model, _config(), batches=batches, loss_fn=InterruptAt(adapter, interrupt_at),
                      eval_fn=lambda m: float(torch.no_grad()(evals)(m)), state_dir=state)
    assert (state / "state.pt").is_file()
    saved = torch.load(state / "state.pt", weights_only=True)
    assert saved["phase"] == ("search" if interrupt_at <= 8 else "retrain")
    res = upop.compress(build_tiny("vit", "ViTForImageClassification"), _config(), batches=batches,
                        eval_fn=lambda m: float(torch.no_grad()(evals)(m)), state_dir=state, resume=True)
    assert res.search.kept == ref.search.kept
    assert [h["pi"] for h in res.search.history] == [h["pi"] for h in ref.search.history]
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(v, res.model.state_dict()[k], atol=1e-6), k
    assert state.exists()  # kept until the output is written
    res.save(tmp_path / "out")
    assert not state.exists()  # cleared once it is


def test_resume_with_other_settings_or_nothing_to_resume(tmp_path):
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    batches = batches_for(adapter, model, n=3)
    with pytest.raises(upop.ConfigError, match="nothing to resume"):
        upop.compress(model, _config(), batches=batches, state_dir=tmp_path / "none", resume=True)
    with pytest.raises(KeyboardInterrupt):
        upop.compress(model, _config(), batches=batches, loss_fn=InterruptAt(adapter, 3), state_dir=tmp_path / "s")
    other = _config()
    other.search.lr = 5e-4
    with pytest.raises(upop.ConfigError, match="used other settings"):
        upop.compress(build_tiny("vit", "ViTForImageClassification"), other, batches=batches,
                      state_dir=tmp_path / "s", resume=True)


def test_sigint_to_a_running_compress_then_resume(tmp_path):
    model, data = vit_run_folder(tmp_path)
    exe = os.path.join(os.path.dirname(sys.executable), "upop")
    cmd = [exe, "compress", "--model", str(model), "--ratio", "0.5", "--data", str(data), "--batch-size", "4",
           "--search-epochs", "300", "--retrain-epochs", "1", "--checkpoint-every", "10", "--no-latency",
           "--out", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "out.partial"
    # Interrupt once the search is under way (its first checkpoint is written), however slow the machine.
    deadline = time.monotonic() + 300
    while not (partial / "state.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and (partial / "state.pt").is_file()
    assert not (tmp_path / "out").exists()  # nothing that looks finished
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "upop_manifest.json").is_file() and not partial.exists()


@pytest.mark.parametrize("every,expected", [(0, [("retrain", 0), ("retrain", 6)]),
                                            (3, [("search", 3), ("search", 6), ("retrain", 0), ("retrain", 3),
                                                 ("retrain", 6)])])
def test_what_is_checkpointed_when(tmp_path, monkeypatch, every, expected):
    """The ends of the search and of the retrain always; every N steps and each retrain epoch only with
    checkpoint_every > 0; the finished run (phase done) until its output is written."""
    from upop.run.state import StateStore

    written = []
    real = StateStore.save

    def record(self, state):
        written.append((state.phase, state.step()))
        real(self, state)

    monkeypatch.setattr(StateStore, "save", record)
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    res = upop.compress(model, _config(), batches=batches_for(adapter, model, n=3), state_dir=tmp_path / "s",
                        checkpoint_every=every)
    assert written == expected + [("done", 0)]  # the finished run is kept until its output is written
    res.save(tmp_path / "out")
    assert not (tmp_path / "s").exists()


def test_resume_with_other_task_options_is_one_line(tmp_path):
    # augmentation, momentum and k_test live in the task options, not the config: they are checked too
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    batches = batches_for(adapter, model, n=3)
    with pytest.raises(KeyboardInterrupt):
        upop.compress(model, _config(), batches=batches, loss_fn=InterruptAt(adapter, 3), state_dir=tmp_path / "s",
                      task_options={"augment": "none", "workers": 0})
    with pytest.raises(upop.ConfigError, match="trained with augment=none, this one with augment=default"):
        upop.compress(build_tiny("vit", "ViTForImageClassification"), _config(), batches=batches,
                      state_dir=tmp_path / "s", resume=True, task_options={"augment": "default", "workers": 0})
    res = upop.compress(build_tiny("vit", "ViTForImageClassification"), _config(), batches=batches,
                        state_dir=tmp_path / "s", resume=True, task_options={"augment": "none", "workers": 2})
    assert res.search.kept  # the worker count may differ: it changes only how fast images arrive
