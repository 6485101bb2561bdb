"""Every demo's slim checkpoint carries every processor it needs: it evaluates, compresses again,
exports, and its export predicts. (The shapes set is the default cache's, as a user's run uses it.)"""

from pathlib import Path

import pytest
from typer.testing import CliRunner

import upop
from upop.models.demo import DEMOS
from upop_cli.app import app

runner = CliRunner()
TEXT = {"retrieval": ["a red circle on the left"], "nlvr": ["there are two shapes in total"],
        "classification": [], "vqa": ["what color is the circle?"]}


def _has_image_processor(folder):
    import transformers

    assert transformers.AutoImageProcessor.from_pretrained(str(folder), trust_remote_code=False) is not None


def _compress(source, ratio, out):
    """A short compression of ``source`` (a demo name or a slim folder) on example batches: what matters
    here is what the saved folder holds, not the metric (evaluations are the CLI's ``eval`` below)."""
    import torch

    from upop.adapters import get_adapter
    from upop.models.hub import load_pretrained

    model = upop.load(source) if Path(source).is_dir() else load_pretrained(source).model
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    batches = [adapter.example_inputs(model, batch_size=2, generator=g) for _ in range(2)]
    cfg = upop.CompressConfig(ratio=ratio, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    return upop.compress(str(source), cfg, batches=batches).save(out)


@pytest.mark.slow
@pytest.mark.parametrize("demo", sorted(DEMOS))
def test_a_demos_slim_checkpoint_evaluates_recompresses_exports_and_predicts(demo, tmp_path):
    slim = _compress(demo, 0.3, tmp_path / "slim")
    _has_image_processor(slim)
    r = runner.invoke(app, ["eval", str(slim), "--limit", "4", "--json"])
    assert r.exit_code == 0, r.output
    again = _compress(slim, 0.2, tmp_path / "again")
    _has_image_processor(again)
    r = runner.invoke(app, ["export", str(again), "--out", str(tmp_path / "onnx"), "--quiet"])
    assert r.exit_code == 0, r.output
    from upop.models.demo import shapes_dir

    images = sorted((shapes_dir() / "images" / "test").glob("*.png"))[:2]
    task = DEMOS[demo].task
    args = [a for img in images[: 2 if task == "nlvr" else 1] for a in ("-i", str(img))]
    args += [a for t in TEXT[task] for a in ("-t", t)]
    r = runner.invoke(app, ["predict", str(tmp_path / "onnx"), *args])
    assert r.exit_code == 0, r.output
