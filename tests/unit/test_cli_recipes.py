"""``upop recipes list|show`` and the recipe of ``upop compress``: chosen by name or from the data's
annotation files, below --config and flags, one line on a bad name; the demos use none."""

from __future__ import annotations

import json

import pytest
import transformers
from typer.testing import CliRunner

import upop
from upop.run.recipe import load_recipe, recipe_names
from upop_cli.app import app

from ..conftest import build_tiny


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny-blip"
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    model.config.architectures = ["BlipForImageTextRetrieval"]
    model.save_pretrained(path)
    transformers.BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture
def coco(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "coco_karpathy_train.json").write_text("[]")
    return tmp_path / "coco"


@pytest.fixture
def seen(monkeypatch):
    """What the CLI hands to upop.compress (the run itself stops there)."""
    got: dict = {}

    def fake(model, cfg, **kw):
        got.update(cfg=cfg, **kw)
        raise upop.ConfigError("stop here")

    monkeypatch.setattr(upop, "compress", fake)
    return got


def test_list_and_show_round_trip():
    r = _invoke("recipes", "list")
    assert r.exit_code == 0, r.output
    for name in recipe_names():
        assert name[:12] in r.output
    for name in recipe_names():
        r = _invoke("recipes", "show", name, "--json")
        assert r.exit_code == 0 and json.loads(r.output) == load_recipe(name).to_dict()
    r = _invoke("recipes", "show", "blip-nlvr2")
    assert r.exit_code == 0 and "3e-06" in r.output and "81.13" in r.output


def test_unknown_recipe_is_one_line_and_exit_2(tmp_path):
    for args in (("recipes", "show", "nope"), ("compress", "--model", "demo-vit", "--ratio", 0.5, "--recipe", "nope",
                                               "--out", tmp_path / "o")):
        r = _invoke(*args)
        assert r.exit_code == 2 and "unknown recipe 'nope'; known: blip-coco-caption" in r.output
        assert r.output.strip().count("\n") == 0


def test_a_named_recipe_reaches_the_run_and_flags_and_config_win(blip_dir, coco, tmp_path, seen):
    rec = load_recipe("blip-coco-retrieval").options
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--data", coco, "--recipe", "blip-coco-retrieval",
                "--out", tmp_path / "o")
    assert r.exit_code == 2 and "stop here" in r.output
    s, rt = seen["cfg"].search, seen["cfg"].retrain
    assert (s.lambda_attn, s.lambda_mlp, s.lr, s.epochs, s.update_every, s.weight_decay, s.lr_schedule) == \
        (rec["lambda_attn"], rec["lambda_mlp"], rec["lr"], rec["search_epochs"], rec["update_every"],
         rec["weight_decay"], "constant")
    assert (rt.epochs, rt.lr, rt.weight_decay) == (rec["retrain_epochs"], rec["lr"], rec["weight_decay"])
    assert seen["batch_size"] == 32 and seen["task"] == "retrieval"
    assert seen["task_options"] == {"workers": None, "cache_gb": None, "augment": "default", "k_test": 256,
                                         "momentum": True}
    assert "processor gives 32 px; blip-coco-retrieval trained at 384 px" in r.output
    # --config beats the recipe, flags beat both
    cfg = tmp_path / "c.toml"
    cfg.write_text('recipe = "blip-coco-retrieval"\nlr = 3e-5\nk_test = 16\naugment = "none"\n')
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--data", coco, "--config", cfg, "--lr", 7e-5,
                "--weight-decay", 0.1, "--no-momentum", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen["cfg"].search.lr == 7e-5 and seen["cfg"].search.weight_decay == seen["cfg"].retrain.weight_decay == 0.1
    assert seen["task_options"]["k_test"] == 16 and seen["task_options"]["augment"] == "none"
    assert seen["task_options"]["momentum"] is False and seen["cfg"].search.update_every == 200


def test_the_data_folder_chooses_the_recipe_and_none_turns_it_off(blip_dir, coco, tmp_path, seen):
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--data", coco, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "recipe: blip-coco-retrieval (coco annotations in" in r.output
    assert seen["cfg"].search.lambda_attn == pytest.approx(6.4e-3 / 8) and seen["cfg"].search.epochs == 6
    seen.clear()
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--data", coco, "--recipe", "none", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "recipe:" not in r.output
    assert seen["cfg"].search.epochs == upop.SearchConfig().epochs and "k_test" not in seen["task_options"]
    assert seen["task_options"]["augment"] == "default"  # a real model: its family's augmentation


def test_a_recipe_of_another_family_is_one_line(blip_dir, tmp_path):
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--recipe", "deit-imagenet", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "recipe deit-imagenet is for deit models;" in r.output and "is a blip model" in r.output


def test_a_recipe_of_another_task_is_one_line(blip_dir, tmp_path):
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--recipe", "blip-vqa", "--task", "retrieval",
                "--out", tmp_path / "o")
    assert r.exit_code == 2 and "recipe blip-vqa is for the vqa task; this run does retrieval" in r.output


def test_recipe_lambdas_are_the_references_per_gpu_coefficient():
    # the reference divides λ by its processes before DDP averages: what its 8-GPU runs applied is λ / 8
    r = load_recipe("blip-coco-retrieval")
    assert r.gpus == 8
    assert r.options["lambda_attn"] == pytest.approx(6.4e-3 / 8) and r.options["lambda_mlp"] == pytest.approx(2e-4 / 8)
    assert all("momentum" not in load_recipe(n).options for n in recipe_names() if n.startswith("clip-"))


def test_demos_use_no_recipe_and_no_augmentation(coco, tmp_path, seen):
    r = _invoke("compress", "--model", "demo-vit", "--ratio", 0.5, "--data", coco, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "recipe:" not in r.output
    assert seen["task_options"]["augment"] == "none" and "k_test" not in seen["task_options"]


@pytest.mark.parametrize("flag,value,what", [("--augment", "heavy", "one of none, default"),
                                             ("--k-test", "0", "an integer >= 1"),
                                             ("--weight-decay", "-1", "a number >= 0")])
def test_bad_new_options_are_one_line(flag, value, what, tmp_path):
    r = _invoke("compress", "--model", "demo-vit", "--ratio", 0.5, flag, value, "--out", tmp_path / "o")
    assert r.exit_code == 2 and f"{flag} must be {what}" in r.output


def test_the_ratio_picks_the_recipe_row(blip_dir, coco, tmp_path, seen):
    for ratio, epochs in ((0.5, 6), (0.75, 9), (0.8, 9)):
        r = _invoke("compress", "--model", blip_dir, "--ratio", ratio, "--data", coco, "--recipe", "blip-coco-retrieval",
                    "--out", tmp_path / "o")
        assert r.exit_code == 2 and "stop here" in r.output
        assert seen["cfg"].search.epochs == seen["cfg"].retrain.epochs == epochs
        row = 0.5 if ratio == 0.5 else 0.75
        assert f"recipe row: ratio {row:g} of blip-coco-retrieval (rows 0.5, 0.75): {epochs} search" in r.output
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.75, "--data", coco, "--recipe", "blip-coco-retrieval",
                "--search-epochs", 2, "--out", tmp_path / "o")
    assert seen["cfg"].search.epochs == 2 and seen["cfg"].retrain.epochs == 9  # a flag still wins over the row


def test_rerank_and_cost_weights_reach_the_run_and_are_checked(blip_dir, coco, tmp_path, seen):
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--data", coco, "--rerank", "prob",
                "--cost-weights", "paper", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen["task_options"]["rerank"] == "prob" and seen["cfg"].search.cost_weights == "paper"
    r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--data", coco, "--out", tmp_path / "o")
    assert "rerank" not in seen["task_options"] and seen["cfg"].search.cost_weights == "true"  # the defaults
    for flag, bad in (("--rerank", "softmax"), ("--cost-weights", "flops")):
        r = _invoke("compress", "--model", blip_dir, "--ratio", 0.5, "--data", coco, flag, bad, "--out", tmp_path / "o")
        assert r.exit_code == 2 and f"{flag} must be one of" in r.output and r.output.strip().count("\n") == 0
