"""The shipped recipes: readable, within the option rules, for a family and task that exist; detection by
the data folder's annotation files."""

from __future__ import annotations

import pytest

from upop.run import recipe as rc
from upop.adapters import all_adapters
from upop.errors import ConfigError
from upop_cli.recipes_cmd import checked

EXPECTED = {"blip-coco-retrieval", "blip-flickr-retrieval", "blip-coco-caption", "blip-vqa", "blip-nlvr2",
            "clip-coco-retrieval", "clip-flickr-retrieval", "deit-imagenet"}


def test_every_shipped_recipe_is_valid_and_for_a_real_family_and_task():
    assert set(rc.recipe_names()) == EXPECTED
    families = {a.family: a for a in all_adapters()}
    for r in rc.all_recipes():
        opts = checked(r)
        assert r.family in families and r.task in families[r.family].tasks, r.name
        assert opts["task"] == r.task and opts["augment"] == "default" and opts["search_lr_schedule"] == "constant"
        assert {"lambda_attn", "lambda_mlp", "lr", "weight_decay", "batch_size", "search_epochs", "retrain_epochs",
                "update_every"} <= set(opts), r.name
        assert r.image_size in (224, 336, 384, 480) and r.gpus == 8 and r.annotations
        if r.name != "clip-flickr-retrieval":  # the paper has no CLIP Flickr30K row
            assert {"metric", "base", "0.5"} <= set(r.paper), r.name


def test_reference_values():
    get = rc.load_recipe
    # λ: the reference's value over its 8 GPUs (it divides by the world size before DDP averages)
    assert get("blip-nlvr2").options["lambda_attn"] == pytest.approx(4.8e-3 / 8) and get("blip-nlvr2").options["lr"] == 3e-6
    assert get("blip-coco-caption").options["lambda_mlp"] == pytest.approx(1e-3 / 8)
    assert get("blip-vqa").options["lr"] == 2e-5 and get("blip-vqa").image_size == 480
    assert get("blip-coco-retrieval").options["k_test"] == 256 and get("blip-flickr-retrieval").options["k_test"] == 128
    assert get("clip-coco-retrieval").options["weight_decay"] == 0.2 and get("clip-coco-retrieval").image_size == 336
    assert get("deit-imagenet").options["lr"] == 8e-4  # 1e-4 scaled by 512 x 8 GPUs / 512, as the reference does
    assert [get(n).options["retrain_epochs"] for n in ("blip-coco-retrieval", "blip-flickr-retrieval",
                                                       "blip-coco-caption", "blip-vqa", "blip-nlvr2")] == [6, 12, 5, 10, 15]


def test_an_unknown_recipe_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'; known: blip-coco-caption, .*deit-imagenet") as e:
        rc.load_recipe("nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown recipe"):
        rc.load_recipe("../recipes/blip-vqa")


def test_detection_by_annotation_names(tmp_path):
    (tmp_path / "coco_karpathy_train.json").write_text("[]")
    assert rc.detect("blip", "retrieval", tmp_path).name == "blip-coco-retrieval"
    assert rc.detect("blip", "caption", tmp_path).name == "blip-coco-caption"
    assert rc.detect("clip", "retrieval", tmp_path).name == "clip-coco-retrieval"
    assert rc.detect("vit", "classification", tmp_path) is None
    assert rc.detect("blip", "retrieval", tmp_path / "missing") is None and rc.detect("blip", "retrieval", None) is None
    (tmp_path / "flickr30k_train.json").write_text("[]")  # two datasets: left to --recipe
    assert rc.detect("blip", "retrieval", tmp_path) is None
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    assert rc.detect("deit", "classification", tmp_path).name == "deit-imagenet"


def test_a_bad_value_in_a_recipe_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text('family = "blip"\ntask = "retrieval"\ndataset = "x"\nannotations = ["a.json"]\n'
                                        '[compress]\nlr = -1\n')
    monkeypatch.setattr(rc, "RECIPES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"^recipe mine: lr must be a number >= 0, got -1$"):
        checked(rc.load_recipe("mine"))
    (tmp_path / "mine.toml").write_text('family = "blip"\ntask = "retrieval"\ndataset = "x"\nannotations = ["a.json"]\n'
                                        '[compress]\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match="recipe mine: unknown option"):
        checked(rc.load_recipe("mine"))
    (tmp_path / "mine.toml").write_text('family = "blip"\n')
    with pytest.raises(ConfigError, match="recipe mine.toml lacks task, dataset, annotations, compress"):
        rc.load_recipe("mine")


#: the reference's compress scripts (sdc17/UPop scripts/compress_*_{2x,3x,4x,5x,10x}.sh): --p and --epoch
REFERENCE_SCRIPTS = {
    "blip-coco-retrieval": {0.5: 6, 0.75: 9}, "blip-flickr-retrieval": {0.5: 12, 0.75: 18},
    "blip-coco-caption": {0.5: 5, 0.75: 8}, "blip-vqa": {0.5: 10, 0.75: 15},
    "blip-nlvr2": {0.5: 15, 0.667: 20, 0.75: 23, 0.8: 24, 0.9: 27},
    "clip-coco-retrieval": {0.5: 6, 0.75: 9}, "clip-flickr-retrieval": {0.5: 12, 0.75: 18},
}


def _reference_row(script_epochs: dict[float, int], ratio: float) -> int:
    """The script a user reproducing the paper would run for ``ratio``: the one whose --p is nearest."""
    p = sorted(script_epochs, key=lambda q: (abs(q - ratio), q))[0]
    return script_epochs[p]


@pytest.mark.parametrize("name", sorted(REFERENCE_SCRIPTS))
def test_recipe_rows_are_chosen_by_ratio(name):
    r = rc.load_recipe(name)
    for ratio in (0.3, 0.5, 0.55, 0.6, 0.667, 0.7, 0.75, 0.78, 0.8, 0.85, 0.9, 0.95, *REFERENCE_SCRIPTS[name]):
        opts = checked(r, ratio)
        want = _reference_row(REFERENCE_SCRIPTS[name], ratio)
        assert opts["search_epochs"] == opts["retrain_epochs"] == want, (name, ratio)
        assert {k: v for k, v in opts.items() if "epochs" not in k} == \
            {k: v for k, v in r.options.items() if "epochs" not in k}  # a row changes the epochs only
    assert checked(r)["search_epochs"] == REFERENCE_SCRIPTS[name][0.5]  # no ratio (a latency target): the 2x row


#: the reference's DeiT scripts (compress_classification_imagenet_0{1,2,3,4,5}0x.sh): --p and --interval
DEIT_INTERVALS = {0.1: 1600, 0.2: 1000, 0.3: 800, 0.4: 800, 0.5: 800}


def test_deit_rows_change_the_update_interval_by_ratio():
    r = rc.load_recipe("deit-imagenet")
    for ratio in (0.05, 0.1, 0.14, 0.2, 0.24, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 0.9):
        opts = checked(r, ratio)
        assert opts["update_every"] == _reference_row(DEIT_INTERVALS, ratio), ratio
        assert {k: v for k, v in opts.items() if k != "update_every"} == \
            {k: v for k, v in r.options.items() if k != "update_every"}  # a row changes the interval only


def test_a_bad_row_is_one_line(tmp_path, monkeypatch):
    head = 'family = "blip"\ntask = "retrieval"\ndataset = "x"\nannotations = ["a.json"]\n[compress]\nlr = 1e-5\n'
    monkeypatch.setattr(rc, "RECIPES_DIR", tmp_path)
    (tmp_path / "mine.toml").write_text(head + '[rows."1.5"]\nsearch_epochs = 2\n')
    with pytest.raises(ConfigError, match="ratio must be a number strictly between 0 and 1"):
        rc.load_recipe("mine")
    (tmp_path / "mine.toml").write_text(head + '[rows."0.75"]\nsearch_epochs = 0\n')
    with pytest.raises(ConfigError, match=r"^recipe mine, row 0.75: search_epochs must be an integer >= 1, got 0$"):
        checked(rc.load_recipe("mine"), 0.75)
