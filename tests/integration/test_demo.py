"""The README's main job: `upop compress --model demo-* --ratio 0.5`, offline, on the built-in data."""

import json

import pytest
from typer.testing import CliRunner

from upop.models.demo import DEMOS, SHAPES_VERSION, build_tokenizer, demo_path
from upop_cli.app import app


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("upop-cache")


@pytest.mark.parametrize("demo", sorted(DEMOS))
def test_demo_compress_runs_offline_with_no_other_argument(demo, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_CACHE", str(cache))
    out = tmp_path / "out"
    # Reduced epochs and evaluation size: the full defaults are what the README times.
    r = CliRunner().invoke(app, ["compress", "--model", demo, "--ratio", "0.5", "--search-epochs", "1",
                                 "--retrain-epochs", "1", "--eval-limit", "40", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["before"]["primary"] > 0
    assert rep["params"]["after"]["total"] < rep["params"]["before"]["total"]
    assert (cache / SHAPES_VERSION / ".complete").is_file()


@pytest.mark.parametrize("demo", sorted(DEMOS))
def test_shipped_demo_models_are_ordinary_hf_folders(demo):
    import transformers

    path = demo_path(demo)
    model = transformers.AutoConfig.from_pretrained(path)
    assert model.architectures == [DEMOS[demo].class_name]
    summary = json.loads((path / "upop_demo.json").read_text())
    assert summary["test"]["primary"] > 50  # good at its task before any compression


def test_the_demo_tokenizer_is_built_offline_and_round_trips():
    tok = build_tokenizer()
    ids = tok(["a small red circle on the left, a blue square in the middle"])["input_ids"][0]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a small red circle on the left , a blue square in the middle"
