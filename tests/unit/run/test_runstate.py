"""The run state: typed, round-tripped, checked on load, upop's own folder, and kept until the output is written."""

import os

import pytest
import torch

import upop
from upop.adapters import get_adapter
from upop.errors import CheckpointError
from upop.run.report import Report
from upop.run.state import STATE_MARKER, Baseline, RunState, StateStore

from ...conftest import batches_for, build_tiny


def _config():
    return upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=4, update_every=2, lr=1e-3),
                               retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=2, lr=1e-3))


def test_a_state_round_trips_through_its_folder(tmp_path):
    store = StateStore(tmp_path / "s", {"a": 1}, {"world_size": 1})
    state = RunState("retrain", Baseline(test={"acc": 50.0}, val=0.5), search_result={"kept": {"m": [0, 2]}},
                     slim_model={"w": torch.arange(3.0)})
    store.save(state)
    back = store.load()
    assert back.phase == "retrain" and back.baseline == state.baseline and back.search_result == state.search_result
    assert torch.equal(back.slim_model["w"], torch.arange(3.0)) and back.version == state.version
    assert (tmp_path / "s" / STATE_MARKER).is_file()


@pytest.mark.parametrize("content", [b"\x00garbage\xff" * 10, "pickle-free but wrong"],
                         ids=["random-bytes", "wrong-shape"])
def test_a_damaged_or_malformed_state_is_one_clear_error(tmp_path, content):
    store = StateStore(tmp_path / "s", {"a": 1})
    store.save(RunState("search", Baseline(), search={"step": 1}))
    if isinstance(content, bytes):
        (tmp_path / "s" / "state.pt").write_bytes(content)
    else:  # right config, but the fields have the wrong types
        torch.save({"config": {"a": 1}, "run": {}, "version": 1, "phase": "retrain", "baseline": {"test": None, "val": None},
                    "search_result": "x"}, tmp_path / "s" / "state.pt")
    with pytest.raises(CheckpointError, match="state"):
        store.load()


def test_a_newer_state_version_is_refused(tmp_path):
    store = StateStore(tmp_path / "s", {"a": 1})
    torch.save({"config": {"a": 1}, "version": 99, "phase": "search", "baseline": {"test": None, "val": None},
                "search": {"step": 1}}, tmp_path / "s.pt")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / STATE_MARKER).write_text("")
    os.replace(tmp_path / "s.pt", tmp_path / "s" / "state.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        store.load()


def test_a_foreign_folder_of_that_name_is_refused_and_never_cleared(tmp_path):
    mine = tmp_path / "run.partial"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    with pytest.raises(CheckpointError, match="not a upop run state"):
        upop.compress(model, _config(), batches=batches_for(adapter, model, n=2), state_dir=mine)
    StateStore(mine, {}).clear()
    assert (mine / "important.txt").read_text() == "keep"


class _NoTraining:
    def __call__(self, model, batch):
        raise AssertionError("a resumed finished run must not train again")


def test_a_failed_final_save_keeps_the_run_and_resume_only_writes(tmp_path, monkeypatch):
    from upop.run import pipeline

    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    batches = batches_for(adapter, model, n=2)
    state = tmp_path / "out.partial"
    res = upop.compress(model, _config(), batches=batches, eval_fn=lambda m: 0.0, state_dir=state)

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "save_slim", full_disk)
    with pytest.raises(OSError):
        res.save(tmp_path / "out")
    assert (state / "state.pt").is_file()  # nothing lost
    monkeypatch.undo()
    again = upop.compress(build_tiny("vit", "ViTForImageClassification"), _config(), batches=batches,
                          loss_fn=_NoTraining(), eval_fn=lambda m: 0.0, state_dir=state, resume=True)
    assert again.report.to_dict() == res.report.to_dict()
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    again.save(tmp_path / "out")
    assert (tmp_path / "out" / "report.json").is_file() and not state.exists()


def test_the_report_round_trips():
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    res = upop.compress(model, _config(), batches=batches_for(adapter, model, n=2), eval_fn=lambda m: 0.0)
    assert Report.from_dict(res.report.to_dict()) == res.report


def test_an_empty_folder_the_user_made_is_used_but_not_removed(tmp_path):
    mine = tmp_path / "s"
    mine.mkdir()
    store = StateStore(mine, {"a": 1})
    store.save(RunState("search", Baseline(), search={"step": 1}))
    store.clear()
    assert mine.is_dir() and not any(mine.iterdir())
    made = StateStore(tmp_path / "new", {"a": 1})
    made.save(RunState("search", Baseline(), search={"step": 1}))
    made.clear()
    assert not (tmp_path / "new").exists()


def test_a_state_from_an_earlier_version_is_named_as_such(tmp_path):
    old = tmp_path / "s"
    old.mkdir()
    torch.save({"config": {}, "phase": "search"}, old / "state.pt")
    with pytest.raises(CheckpointError, match="earlier upop version"):
        StateStore(old, {}).load()
