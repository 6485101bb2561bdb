"""The synthetic shapes set: a scene grammar, its images, and annotations in the users' formats.

A scene holds 1-3 shapes, one per column (left, middle, right), each with a colour, a shape
and a size. Captions come from a small grammar and parse back to the facts they state; near-miss
captions change one attribute or swap two positions, so a model that does not bind colour,
shape and place cannot tell them apart. Everything is a function of the seed.

Layout written by ``shapes(out_dir)``::

    images/<split>/<n>.png
    retrieval_<split>.json     BLIP/UPop Karpathy format (train: one record per caption;
                               val/test: {"image", "caption": [...]})
    vqa_<split>.json           BLIP VQA format {"image", "question", "answer": [...]}
    classification/<split>/<colour>_<shape>/<n>.png    ImageFolder, one shape per image
    nlvr_<split>.json          BLIP NLVR2 format {"images": [a, b], "sentence", "label": "True"|"False"}:
                               a statement about two of the split's scenes, true for half of the pairs
    scenes_<split>.json        the ground truth scenes
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str

    def phrase(self, with_size: bool = True) -> str:
        return f"a {self.size + ' ' if with_size else ''}{self.colour} {self.shape}"


Scene = tuple[Obj, ...]  # ordered left to right


def random_obj(rng: random.Random, position: str) -> Obj:
    return Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), position)


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice((1, 2, 2, 3, 3))
    positions = sorted(rng.sample(POSITIONS, n), key=POSITIONS.index)
    return tuple(random_obj(rng, p) for p in positions)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene) -> list[str]:
    """Several true captions: a full one, one without sizes, and one with a relation."""
    out = [_join([f"{o.phrase()} {POSITION_PHRASE[o.position]}" for o in scene])]
    out.append(_join([f"{o.phrase(False)} {POSITION_PHRASE[o.position]}" for o in scene]))
    if len(scene) == 1:
        out.append(f"only {scene[0].phrase()}")
    else:
        a, b = scene[0], scene[-1]
        out.append(f"{a.phrase()} left of {b.phrase()}")
    return out


def near_miss(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one attribute changed, or two shapes swapped."""
    scene_l = list(scene)
    if len(scene_l) > 1 and rng.random() < 0.3:
        i, j = rng.sample(range(len(scene_l)), 2)
        a, b = scene_l[i], scene_l[j]
        if (a.colour, a.shape, a.size) != (b.colour, b.shape, b.size):
            scene_l[i] = Obj(b.colour, b.shape, b.size, a.position)
            scene_l[j] = Obj(a.colour, a.shape, a.size, b.position)
            return tuple(scene_l)
    i = rng.randrange(len(scene_l))
    o = scene_l[i]
    attr = rng.choice(("colour", "shape", "size"))
    pool = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
    new = rng.choice([v for v in pool if v != getattr(o, attr)])
    scene_l[i] = Obj(**{**asdict(o), attr: new})
    return tuple(scene_l)


_OBJ = r"a (?:(small|large) )?(red|green|blue|yellow) (circle|square|triangle)"
_POS = r"(on the left|in the middle|on the right)"


def parse_caption(caption: str) -> list[dict[str, str]]:
    """The facts a caption states: one dict per shape (colour, shape; size/position when stated)."""
    facts: list[dict[str, str]] = []
    rel = re.fullmatch(f"{_OBJ} left of {_OBJ}", caption)
    if rel:
        g = rel.groups()
        for k, (size, colour, shape) in enumerate((g[0:3], g[3:6])):
            f = {"colour": colour, "shape": shape, "relation": "leftmost" if k == 0 else "rightmost"}
            if size:
                f["size"] = size
            facts.append(f)
        return facts
    only = re.fullmatch(f"only {_OBJ}", caption)
    if only:
        size, colour, shape = only.groups()
        return [{"colour": colour, "shape": shape, "size": size, "relation": "only"}]
    for m in re.finditer(f"{_OBJ} {_POS}", caption):
        size, colour, shape, pos = m.groups()
        f = {"colour": colour, "shape": shape, "position": pos.split()[-1]}
        if size:
            f["size"] = size
        facts.append(f)
    if not facts:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return facts


def facts_hold(facts: list[dict[str, str]], scene: Scene) -> bool:
    for f in facts:
        rel = f.get("relation")
        if rel == "only":
            cands = list(scene) if len(scene) == 1 else []
        elif rel == "leftmost":
            cands = [scene[0]]
        elif rel == "rightmost":
            cands = [scene[-1]]
        else:
            cands = [o for o in scene if o.position == f["position"]]
        if not any(all(getattr(o, k) == v for k, v in f.items() if k not in ("relation",)) for o in cands):
            return False
    if any("position" in f for f in facts) and len(facts) != len(scene):
        return False
    return True


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Short-answer questions about a scene (answers are single words)."""
    qa = [("how many shapes are there?", COUNT_WORDS[len(scene)])]
    o = rng.choice(scene)
    pos = POSITION_PHRASE[o.position]
    qa.append((f"what color is the shape {pos}?", o.colour))
    qa.append((f"what shape is {pos}?", o.shape))
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    present = any(x.colour == colour and x.shape == shape for x in scene)
    qa.append((f"is there a {colour} {shape}?", "yes" if present else "no"))
    return qa


def _has(scene: Scene, colour: str, shape: str | None) -> bool:
    return any(o.colour == colour and (shape is None or o.shape == shape) for o in scene)


def pair_statement(left: Scene, right: Scene, rng: random.Random, want: bool) -> str | None:
    """A statement about both scenes whose truth is ``want``; None if this template cannot give it."""
    kind = rng.randrange(6)
    if kind == 3:
        truth = len(left) > len(right)
        return "the left image has more shapes than the right image" if truth == want else None
    if kind == 4:
        truth = len(left) == len(right)
        return "the two images have the same number of shapes" if truth == want else None
    for _ in range(20):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if kind == 0:
            truth, text = _has(left, colour, shape) and _has(right, colour, shape), f"both images contain a {colour} {shape}"
        elif kind == 1:
            truth = _has(left, colour, shape) != _has(right, colour, shape)
            text = f"exactly one image contains a {colour} {shape}"
        elif kind == 2:
            n = rng.randint(2, 6)
            truth, text = len(left) + len(right) == n, f"there are {COUNT_WORDS[n]} shapes in total"
        else:
            truth, text = _has(left, colour, None) and _has(right, colour, None), f"each image contains a {colour} shape"
        if truth == want:
            return text
    return None


def pairs(scenes: list[Scene], images: list[str], rng: random.Random, n: int) -> list[dict[str, object]]:
    """``n`` NLVR records over the scenes; the labels alternate at random, half true."""
    out: list[dict[str, object]] = []
    while len(out) < n:
        want = rng.random() < 0.5  # fixed first, then pairs and templates drawn until one states it
        text = None
        while text is None:
            a, b = rng.sample(range(len(scenes)), 2)
            text = pair_statement(scenes[a], scenes[b], rng, want)
        out.append({"images": [images[a], images[b]], "sentence": text, "label": str(want)})
    return out


def draw(scene: Scene, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (rng.randint(0, 40),) * 3)
    d = ImageDraw.Draw(img)
    col_w = size / 3
    for o in scene:
        r = (0.42 if o.size == "large" else 0.24) * col_w
        cx = (POSITIONS.index(o.position) + 0.5) * col_w + rng.uniform(-0.08, 0.08) * col_w
        cy = size / 2 + rng.uniform(-0.25, 0.25) * size
        fill = COLOURS[o.colour]
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            d.ellipse(box, fill=fill)
        elif o.shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def shapes(out_dir: str | os.PathLike, train: int = 2000, val: int = 200, test: int = 200, seed: int = 0,
           image_size: int = 64, classification_per_class: tuple[int, int, int] = (100, 20, 20)) -> Path:
    """Write the shapes set to ``out_dir`` and return it. The same seed writes the same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", train), ("val", val), ("test", test)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        retrieval, vqa, scenes = [], [], []
        for i in range(n):
            scene = random_scene(rng)
            rel = f"images/{split}/{i:05d}.png"
            draw(scene, image_size, rng).save(out / rel)
            caps = captions(scene)
            if split == "train":
                retrieval += [{"image": rel, "caption": c, "image_id": f"{split}_{i}"} for c in caps]
            else:
                miss = near_miss(scene, rng)
                retrieval.append({"image": rel, "caption": caps, "near_miss": captions(miss)[0]})
            for k, (q, a) in enumerate(questions(scene, rng)):
                vqa.append({"image": rel, "question": q, "answer": [a, a, a], "question_id": f"{split}_{i}_{k}"})
            scenes.append({"image": rel, "objects": [asdict(o) for o in scene]})
        # Its own random stream: the other annotations stay byte-identical to sets written before.
        nlvr_rng = random.Random(seed * 7919 + len(split) * 31 + n)
        split_scenes = [scene_from_json(s["objects"]) for s in scenes]
        _write_json(out / f"nlvr_{split}.json", pairs(split_scenes, [s["image"] for s in scenes], nlvr_rng, n))
        _write_json(out / f"retrieval_{split}.json", retrieval)
        _write_json(out / f"vqa_{split}.json", vqa)
        _write_json(out / f"scenes_{split}.json", scenes)
    for split, per_class in zip(("train", "val", "test"), classification_per_class):
        for colour in COLOURS:
            for shape in SHAPES:
                d = out / "classification" / split / f"{colour}_{shape}"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    obj = Obj(colour, shape, rng.choice(SIZES), rng.choice(POSITIONS))
                    draw((obj,), image_size, rng).save(d / f"{i:05d}.png")
    return out


def scene_from_json(objects: list[dict[str, str]]) -> Scene:
    return tuple(Obj(**o) for o in objects)
