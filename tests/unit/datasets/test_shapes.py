import hashlib
import json
import random

from upop.datasets import shapes
from upop.datasets.shapes import captions, facts_hold, near_miss, parse_caption, random_scene, scene_from_json


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_the_generator_is_deterministic(tmp_path):
    a = shapes(tmp_path / "a", train=6, val=3, test=3, seed=7, classification_per_class=(1, 1, 1))
    b = shapes(tmp_path / "b", train=6, val=3, test=3, seed=7, classification_per_class=(1, 1, 1))
    c = shapes(tmp_path / "c", train=6, val=3, test=3, seed=8, classification_per_class=(1, 1, 1))
    assert _digest(a) == _digest(b) != _digest(c)


def test_captions_parse_back_to_their_scene(tmp_path):
    out = shapes(tmp_path / "s", train=20, val=10, test=10, classification_per_class=(1, 1, 1))
    scenes = {s["image"]: scene_from_json(s["objects"]) for s in json.loads((out / "scenes_val.json").read_text())}
    for rec in json.loads((out / "retrieval_val.json").read_text()):
        scene = scenes[rec["image"]]
        for cap in rec["caption"]:
            assert facts_hold(parse_caption(cap), scene), cap
        # the near miss differs in one attribute or relation: it is false of the scene
        assert not facts_hold(parse_caption(rec["near_miss"]), scene), rec["near_miss"]


def test_near_misses_are_always_false_and_captions_are_true():
    rng = random.Random(0)
    for _ in range(500):
        scene = random_scene(rng)
        for cap in captions(scene):
            assert facts_hold(parse_caption(cap), scene)
        miss = near_miss(scene, rng)
        assert miss != scene
        assert not facts_hold(parse_caption(captions(miss)[0]), scene)


def test_vqa_answers_are_true_of_the_scene(tmp_path):
    out = shapes(tmp_path / "s", train=10, val=2, test=2, classification_per_class=(1, 1, 1))
    scenes = {s["image"]: scene_from_json(s["objects"]) for s in json.loads((out / "scenes_train.json").read_text())}
    counts = {1: "one", 2: "two", 3: "three"}
    for q in json.loads((out / "vqa_train.json").read_text()):
        scene = scenes[q["image"]]
        if q["question"].startswith("how many"):
            assert q["answer"][0] == counts[len(scene)]
        elif q["question"].startswith("is there a "):
            colour, shape = q["question"][len("is there a "):-1].split()
            present = any(o.colour == colour and o.shape == shape for o in scene)
            assert q["answer"][0] == ("yes" if present else "no")
    classes = sorted(p.name for p in (out / "classification" / "train").iterdir())
    assert len(classes) == 12 and "red_circle" in classes


def test_nlvr_statements_are_labelled_by_the_two_scenes(tmp_path):
    """Each statement is re-read here with its own grammar and checked against the scenes."""
    import json
    import re

    out = shapes(tmp_path / "s", train=60, val=10, test=10, classification_per_class=(1, 1, 1))
    scenes = {s["image"]: s["objects"] for s in json.loads((out / "scenes_train.json").read_text())}
    recs = json.loads((out / "nlvr_train.json").read_text())
    assert len(recs) == 60 and 0.35 <= sum(r["label"] == "True" for r in recs) / 60 <= 0.65
    words = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}

    def has(objs, colour, shape=None):
        return any(o["colour"] == colour and (shape is None or o["shape"] == shape) for o in objs)

    for r in recs:
        left, right = (scenes[i] for i in r["images"])
        s = r["sentence"]
        if m := re.fullmatch(r"both images contain a (\w+) (\w+)", s):
            truth = has(left, *m.groups()) and has(right, *m.groups())
        elif m := re.fullmatch(r"exactly one image contains a (\w+) (\w+)", s):
            truth = has(left, *m.groups()) != has(right, *m.groups())
        elif m := re.fullmatch(r"there are (\w+) shapes in total", s):
            truth = len(left) + len(right) == words[m.group(1)]
        elif m := re.fullmatch(r"each image contains a (\w+) shape", s):
            truth = has(left, m.group(1)) and has(right, m.group(1))
        elif s == "the left image has more shapes than the right image":
            truth = len(left) > len(right)
        else:
            assert s == "the two images have the same number of shapes", s
            truth = len(left) == len(right)
        assert str(truth) == r["label"], r
