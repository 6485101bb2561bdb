"""Training augmentation: the operations, the per-image seeds, and that an item's pixels depend only on
(seed, epoch, item) — not on the batch split, the rank or a resume — while evaluation pixels stay the processor's."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from upop.training import augment as aug
from upop.adapters import get_adapter
from upop.datasets.loading import SeededPixels
from upop.datasets import shapes
from upop.models.demo import build_tokenizer
from upop.errors import ConfigError
from upop.tasks import Preprocessor, make_task

from ...conftest import build_tiny


def _image(seed: int = 0, h: int = 40, w: int = 48) -> torch.Tensor:
    """Not the full range (autocontrast and equalize would have nothing to do)."""
    return torch.from_numpy(np.random.default_rng(seed).integers(40, 200, (3, h, w), dtype=np.uint8))


def test_item_seed_is_a_function_of_seed_epoch_item_and_image():
    base = aug.item_seed(0, 0, 5, 0)
    assert base == aug.item_seed(0, 0, 5, 0)
    others = {aug.item_seed(1, 0, 5, 0), aug.item_seed(0, 1, 5, 0), aug.item_seed(0, 0, 6, 0), aug.item_seed(0, 0, 5, 1)}
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63


@pytest.mark.parametrize("name", list(aug.POLICIES))
def test_a_batch_is_augmented_image_by_image_from_the_seeds(name):
    a = aug.Augmenter(aug.POLICIES[name])
    px = torch.stack([_image(i) for i in range(6)])
    seeds = [aug.item_seed(3, 0, i) for i in range(6)]
    whole = a.pixels(px, a.draws(seeds, 40, 48))
    assert whole.dtype == torch.uint8 and whole.shape == px.shape
    alone = torch.cat([a.pixels(px[i : i + 1], a.draws(seeds[i : i + 1], 40, 48)) for i in range(6)])
    assert torch.equal(whole, alone)
    assert torch.equal(whole, a.pixels(px, a.draws(seeds, 40, 48)))  # seeded: the same again
    other = a.pixels(px, a.draws([aug.item_seed(3, 1, i) for i in range(6)], 40, 48))
    assert not torch.equal(whole, other)
    assert not torch.equal(whole, px)


def test_the_loss_autocast_does_not_reach_the_pixels():
    a = aug.Augmenter(aug.POLICIES["blip-randaugment"])
    px = torch.stack([_image(i) for i in range(4)])
    draws = a.draws([aug.item_seed(0, 0, i) for i in range(4)], 40, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = a.pixels(px, draws)
    assert torch.equal(inside, a.pixels(px, draws))


def test_crop_boxes_stay_inside_and_cover_the_scale_range():
    rng = random.Random(0)
    areas = []
    for _ in range(300):
        top, left, h, w = aug._crop_box(rng, 40, 60, (0.5, 1.0))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        areas.append(h * w / 2400)
    assert min(areas) < 0.6 and max(areas) > 0.9


@pytest.mark.parametrize("op", list(aug.OPS))
def test_each_operation_keeps_the_shape_and_the_range(op):
    x = _image(1).float()
    arg = aug.OPS[op].level(7, random.Random(1), x.shape[-1])
    y = aug.OPS[op].apply(x, arg, (128.0, 128.0, 128.0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 255
    if op != "identity":
        assert not torch.equal(y, x), op


def test_equalize_and_autocontrast_match_pil():
    arr = np.random.default_rng(2).integers(30, 200, (40, 48, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1).float()
    eq = np.asarray(ImageOps.equalize(Image.fromarray(arr)))
    assert np.array_equal(aug._equalize(x).permute(1, 2, 0).numpy().astype(np.uint8), eq)
    ac = np.asarray(ImageOps.autocontrast(Image.fromarray(arr))).astype(float)
    assert np.abs(aug._autocontrast(x).permute(1, 2, 0).numpy() - ac).max() <= 1.0


def test_rotation_by_zero_and_translation_by_zero_change_nothing():
    x = _image(4).float()
    assert torch.allclose(aug._rotate(x, 0.0, (0, 0, 0)), x, atol=1e-3)
    assert torch.allclose(aug.OPS["translate_x"].apply(x, 0.0, (0, 0, 0)), x, atol=1e-3)


def test_erasing_fills_a_box_with_noise_and_leaves_the_rest():
    a = aug.Augmenter(aug.POLICIES["deit-randaugment"])
    seeds = [s for s in (aug.item_seed(0, 0, i) for i in range(200)) if a.policy.draw(s, 32, 32).erase][:2]
    draws = a.draws(seeds, 32, 32)
    px = torch.zeros(2, 3, 32, 32)
    out = a.erase(px, draws)
    for i, d in enumerate(draws):
        top, left, h, w = d.erase
        assert (out[i, :, top : top + h, left : left + w] != 0).float().mean() > 0.99
        assert float(out[i].abs().sum()) == pytest.approx(float(out[i, :, top : top + h, left : left + w].abs().sum()))
    assert torch.equal(out, a.erase(px, draws))


def test_augment_choices():
    blip, clip, vit = get_adapter("blip"), get_adapter("clip"), get_adapter("vit")
    assert aug.augmenter_for(blip, "none") is None and aug.augmenter_for(blip, None) is None
    assert aug.augmenter_for(blip, "default").policy.name == "blip-randaugment"
    assert aug.augmenter_for(clip, "default").policy.name == "blip-randaugment"
    assert aug.augmenter_for(vit, "default").policy.name == "deit-randaugment"
    assert aug.augmenter_for(get_adapter("deit"), "default").policy.erase_prob == 0.25
    with pytest.raises(ConfigError, match="augment must be one of none, default"):
        aug.augmenter_for(blip, "heavy")


# ---- through a task's batches ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("aug") / "d", train=12, val=2, test=2, image_size=24,
                  classification_per_class=(1, 1, 1))


def _task(data, augment: str | None, batch_size: int = 4, family: str = "blip", cls: str = "BlipForImageTextRetrieval",
          task: str = "retrieval"):
    adapter = get_adapter(family)
    model = build_tiny(family, cls, vocab=99)
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32))
    return make_task(adapter, task, prep, data, model=model, batch_size=batch_size, workers=0, augment=augment)


def _pixels(task, batch) -> torch.Tensor:
    return task.images.normalize(batch["pixel_values"])


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_only_training_pixels_are_augmented(data):
    task = _task(data, "default")
    batch = next(iter(task.train_batches()))
    px = batch["pixel_values"]
    assert isinstance(px, SeededPixels) and len(px.seeds) == 4
    plain = task.images.pipeline.normalize(px.plain())
    assert not torch.equal(_pixels(task, batch), plain)
    assert _pixels(task, batch).shape == plain.shape and _pixels(task, batch).dtype == torch.float32
    # evaluation: the processor's pixels, exactly
    recs = task._records("test")
    ref = task.prep.pixels([Image.open(r.image).convert("RGB") for r in recs])
    assert float((task.images.get([r.image for r in recs]) - ref).abs().max()) <= 1e-5
    streamed = next(task.images.stream([[r.image for r in recs]], torch.device("cpu")))
    assert float((streamed - ref).abs().max()) <= 1e-5


def test_without_augmentation_batches_are_plain(data):
    task = _task(data, "none")
    batch = next(iter(task.train_batches()))
    assert type(batch["pixel_values"]) is torch.Tensor


def test_augmentation_leaves_the_batches_and_texts_as_they_were(data):
    """The same items and texts in the same order; only the pixels differ (each a crop of the same image)."""
    on, off = _task(data, "default").train_batches().endless(), _task(data, "none").train_batches().endless()
    for a, b in zip(_take(on, 4), _take(off, 4)):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert a["pixel_values"].plain().shape == b["pixel_values"].shape
    with_aug, without = _task(data, "default"), _task(data, "none")
    assert _first_paths(with_aug) == _first_paths(without)


def test_an_item_has_the_same_pixels_across_ranks_accumulation_and_resume(data):
    one = _task(data, "default", batch_size=4)
    big = [_pixels(one, b) for b in _take(one.train_batches().endless(), 6)]  # two epochs of 3 steps
    # two ranks with half the batch each: rank r holds every second item of the big batch
    half = _task(data, "default", batch_size=2)
    ranks = [[_pixels(half, b) for b in _take(half.train_batches().shard(r, 2).endless(), 6)] for r in range(2)]
    for k in range(6):
        assert torch.equal(big[k][0::2], ranks[0][k]) and torch.equal(big[k][1::2], ranks[1][k])
    # gradient accumulation: two batches of 2 are the big batch's halves
    small = [_pixels(half, b) for b in _take(half.train_batches().endless(), 12)]
    for k in range(6):
        assert torch.equal(big[k], torch.cat(small[2 * k : 2 * k + 2]))
    # resume mid-epoch and across the epoch boundary
    for stop in (1, 3):
        b = one.train_batches()
        it = b.endless()
        _take(it, stop)
        resumed = [_pixels(one, x) for x in _take(one.train_batches().endless(dict(b.position)), 6 - stop)]
        for k, px in enumerate(resumed):
            assert torch.equal(px, big[stop + k])


def test_another_epoch_augments_an_item_differently(data):
    task = _task(data, "default", batch_size=4)
    seen: dict[int, list[torch.Tensor]] = {}
    for batch in _take(task.train_batches().endless(), 6):
        px = _pixels(task, batch)
        for row, s in zip(px, batch["pixel_values"].seeds):
            for epoch in (0, 1):
                for i in range(12):
                    if s == aug.item_seed(task.seed, epoch, i):
                        seen.setdefault(i, [None, None])[epoch] = row
    assert len(seen) >= 8
    for first, second in seen.values():
        if first is not None and second is not None:
            assert not torch.equal(first, second)


def test_both_images_of_an_nlvr_pair_are_augmented_on_their_own(data):
    task = _task(data, "default", batch_size=3, family="blip_nlvr", cls="BlipNlvrForVisualReasoning", task="nlvr")
    batch = next(iter(task.train_batches()))
    px = batch["pixel_values"]
    assert px.shape == (3, 2, 3, 32, 32) and len(px.seeds) == 6 and len(set(px.seeds)) == 6
    out = _pixels(task, batch)
    assert out.shape == (3, 2, 3, 32, 32)
    assert not torch.equal(out, task.images.pipeline.normalize(px.plain()))


# ---- end to end: two ranks search on augmented batches as one process does --------------------------
def _search_on_task(rank: int, world: int, data: str) -> dict:
    import upop
    from upop.pruning.search import search

    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    model.classifier = torch.nn.Linear(model.classifier.in_features, 12)
    model.config.num_labels = 12
    task = make_task(adapter, "classification", Preprocessor(None, adapter.image_processor(32)), data, model=model,
                     batch_size=4 // world, workers=0, augment="default")
    batches = task.train_batches()
    batches = batches.shard(rank, world) if world > 1 else batches
    res = search(model, adapter.modules(model), task.loss, batches, upop.SearchConfig(ratio=0.5, steps=6, update_every=2,
                                                                                       lr=1e-3))
    return {"kept": res.kept, "loss": [h["task_loss"] for h in res.history]}


def _rank(rank: int, world: int, folder: str, data: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    try:
        out = _search_on_task(rank, world, data)
    finally:
        torch.distributed.destroy_process_group()
    torch.save(out, f"{folder}/rank{rank}.pt")


def test_two_ranks_on_augmented_batches_select_what_one_process_selects(tmp_path):
    import torch.multiprocessing as mp

    data = shapes(tmp_path / "d", train=8, val=2, test=2, image_size=24, classification_per_class=(2, 1, 1))
    one = _search_on_task(0, 1, str(data))
    mp.spawn(_rank, args=(2, str(tmp_path), str(data)), nprocs=2, join=True)
    for r in range(2):
        two = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert two["kept"] == one["kept"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize("family,cls,task", [
    ("blip", "BlipForImageTextRetrieval", "retrieval"), ("blip", "BlipForConditionalGeneration", "caption"),
    ("blip", "BlipForQuestionAnswering", "vqa"), ("blip_nlvr", "BlipNlvrForVisualReasoning", "nlvr"),
    ("clip", "CLIPModel", "retrieval"), ("deit", "DeiTForImageClassification", "classification")])
def test_every_trainable_task_trains_on_augmented_pixels(family, cls, task, data, monkeypatch):
    adapter = get_adapter(family)
    model = build_tiny(family, cls, vocab=99) if family != "deit" else build_tiny(family, cls)
    if task == "classification":
        model.classifier = torch.nn.Linear(model.classifier.in_features, 12)
        model.config.num_labels = 12
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32), **adapter.preprocessor_options(model))
    t = make_task(adapter, task, prep, data, model=model, batch_size=2, workers=0, augment="default")
    batch = next(iter(t.train_batches()))
    calls = []
    real = t.images.augment.pixels
    monkeypatch.setattr(t.images.augment, "pixels",
                        lambda px, draws, cropped=False: calls.append(len(draws)) or real(px, draws, cropped))
    loss = t.loss(model.train(), batch)
    assert torch.isfinite(loss) and calls == [2 * (2 if task == "nlvr" else 1)]


def test_equalize_reads_nothing_back_from_the_device():
    """Augmentation may run on the GPU: equalize used to read each channel's histogram step back to the host."""
    from ...gpuless import SyncCounter

    x = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(0)).float()
    x[1] = 9.0  # a channel of one level stays as it is
    with SyncCounter() as reads:
        out = aug._equalize(x)
    assert reads.calls == [] and torch.equal(out[1], x[1])


# ---- the random crop is taken from the decoded original -----------------------------------------
def test_training_crops_come_from_the_decoded_original(data):
    """Each training image is its random resized crop of the ORIGINAL file (box drawn on the original's size,
    PIL bicubic to the processor's output size), as the reference's dataset transform takes it; not a crop of
    the processor's already resized pixels."""
    task = _task(data, "default")
    batch = next(iter(task.train_batches()))
    px = batch["pixel_values"]
    assert isinstance(px, SeededPixels) and px.cropped
    policy = task.images.augment.policy
    oh, ow = task.images.pipeline.out_size
    for i, (path, seed) in enumerate(zip(_first_paths(task), px.seeds)):
        im = Image.open(path).convert("RGB")
        top, left, h, w = policy.crop_box(seed, im.height, im.width)
        want = torch.from_numpy(np.array(im.crop((left, top, left + w, top + h)).resize((ow, oh), Image.BICUBIC)))
        assert torch.equal(px.plain()[i].permute(1, 2, 0), want)
    # the device then flips and augments these pixels without cropping them again
    draws = task.images.augment.draws(px.seeds, oh, ow)
    assert torch.equal(task.images.augment.pixels(px.plain(), draws, True),
                       torch.stack([task.images.augment._one(img, d, True) for img, d in zip(px.plain(), draws)]))


def _first_paths(task):
    """The image paths of the first pass's first training batch, planned as ``Batches`` plans it."""
    b = task.train_batches()
    rng = random.Random(b.seed * 100003)
    return b._plan(b._batches(rng)[0], rng, 0)["pixel_values"].paths


def test_a_crop_box_on_the_original_covers_its_scale_range():
    """Boxes are drawn on the original's size: at scale 0.5–1 of a 64×48 original, never smaller than half its
    area less rounding, and on the same seed the same box every time (worker and device agree)."""
    policy = aug.POLICIES["blip-randaugment"]
    boxes = [policy.crop_box(aug.item_seed(0, 0, i), 48, 64) for i in range(200)]
    assert all(0 <= t and 0 <= lft and t + h <= 48 and lft + w <= 64 for t, lft, h, w in boxes)
    assert min(h * w for _t, _l, h, w in boxes) >= 0.5 * 48 * 64 * 0.9
    assert boxes == [policy.crop_box(aug.item_seed(0, 0, i), 48, 64) for i in range(200)]


def test_without_a_fixed_output_size_the_device_crops_as_before(data):
    task = _task(data, "default")
    task.images.dataset.crop = None  # as for a processor whose output size is not fixed
    batch = next(iter(task.train_batches()))
    assert isinstance(batch["pixel_values"], SeededPixels) and not batch["pixel_values"].cropped
    assert torch.isfinite(_pixels(task, batch)).all()
