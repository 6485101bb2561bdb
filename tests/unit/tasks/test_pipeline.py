"""The input pipeline: workers decode to uint8, the device normalises; batches, order, shards and resume
positions are today's; the pixels are the processor's; the cache stays under its cap."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from upop.datasets import loading as pipeline
from upop.adapters import get_adapter
from upop.datasets import shapes
from upop.datasets.readers import DataError, open_image
from upop.models.demo import build_tokenizer
from upop.training.distributed import _compact
from upop.tasks import Preprocessor, make_task
from upop.tasks.base import Batches, ImageStore

from ...conftest import build_tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Odd sizes and modes, JPEG and PNG: what resize, crop and RGB conversion must agree on."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h, mode, ext) in enumerate([(50, 37, "RGB", "jpg"), (23, 61, "L", "png"), (64, 64, "RGBA", "png"),
                                           (97, 40, "RGB", "jpg")]):
        arr = rng.integers(0, 256, (h, w, len(mode) if mode != "L" else 1), dtype=np.uint8).squeeze()
        out.append(root / f"{i}.{ext}")
        Image.fromarray(arr, mode).save(out[-1])
    return out


def _stock(name: str, **kw):
    return getattr(transformers, name)(**kw)


PROCESSORS = {
    **{f: (lambda f=f: get_adapter(f).image_processor(32)) for f in ("blip", "clip", "siglip", "vit", "deit")},
    # the transformers defaults, and other geometries: shortest edge + crop, resize + crop, bilinear
    "blip-384": lambda: _stock("BlipImageProcessorPil"),
    "clip-224": lambda: _stock("CLIPImageProcessorPil"),
    "clip-40-crop-36": lambda: _stock("CLIPImageProcessorPil", size={"shortest_edge": 40},
                                      crop_size={"height": 36, "width": 36}),
    "deit-40-crop-32": lambda: _stock("DeiTImageProcessorPil", size={"height": 40, "width": 40},
                                      crop_size={"height": 32, "width": 32}),
    "vit-224": lambda: _stock("ViTImageProcessorPil"),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_eval_pixels_equal_the_processor(name, photos):
    proc = PROCESSORS[name]()
    store = ImageStore(Preprocessor(None, proc), workers=0)
    ref = proc(images=[open_image(p) for p in photos], return_tensors="pt")["pixel_values"]
    got = torch.cat(list(store.stream([photos[:3], photos[3:]], CPU)))
    assert store.pipeline.geometry is not None  # the worker's own PIL path, not a fallback
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-5
    assert torch.equal(store.get(photos), got)


def test_the_worker_geometry_is_what_the_processor_resizes_before_rescaling(photos):
    for make in PROCESSORS.values():
        proc = make()
        geometry = pipeline.PixelPipeline(proc).geometry
        for p in photos:
            im = open_image(p)
            raw = proc(images=[im], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
            assert raw.dtype == torch.uint8 and torch.equal(geometry(im).permute(2, 0, 1), raw)


def test_a_processor_with_its_own_steps_is_run_whole(photos):
    class Flipped(transformers.ViTImageProcessorPil):
        def resize(self, image, *a, **kw):
            return super().resize(image, *a, **kw)[:, ::-1].copy()

    proc = Flipped(size={"height": 16, "width": 16})
    store = ImageStore(Preprocessor(None, proc), workers=0)
    ref = proc(images=[open_image(p) for p in photos], return_tensors="pt")["pixel_values"]
    assert store.pipeline.geometry is None
    assert float((store.get(photos) - ref).abs().max()) <= 1e-5


# ---- batches: today's, item for item --------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("s") / "d", train=12, val=2, test=2, image_size=24,
                  classification_per_class=(1, 1, 1))


def _task(data, workers: int, batch_size: int = 4):
    adapter = get_adapter("blip")
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32))
    return make_task(adapter, "retrieval", prep, data, model=model, batch_size=batch_size, workers=workers)


def _today(task, batch_size: int) -> Batches:
    """The synchronous batches upop built before the pipeline: the processor called in the loop."""
    recs = task._records("train")
    pairs = [(r, c) for r, rec in enumerate(recs) for c in range(len(rec.captions))]  # an epoch: every pair once

    def make(idx, rng):
        texts = [recs[pairs[k][0]].captions[pairs[k][1]] for k in idx]
        batch = {"pixel_values": task.prep.pixels([open_image(recs[pairs[k][0]].image) for k in idx])}
        batch.update(task.prep.text(texts))
        return batch

    return Batches(len(pairs), batch_size, make, seed=task.seed, drop_last=len(pairs) > batch_size)


def _assert_same(new: dict, old: dict, store: ImageStore) -> None:
    assert new["pixel_values"].dtype == torch.uint8  # normalised later, on the device
    assert float((store.normalize(new["pixel_values"]) - old["pixel_values"]).abs().max()) <= 1e-5
    assert torch.equal(new["input_ids"], old["input_ids"])
    assert torch.equal(new["attention_mask"], old["attention_mask"])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_todays_batches_single_shards_and_resumed(data, workers):
    task = _task(data, workers)
    new, old = task.train_batches(), _today(task, 4)
    assert len(new) == len(old) == 9  # 12 images × 3 captions, 4 a batch
    it_new, it_old = new.endless(), old.endless()
    for _ in range(19):  # over two pass boundaries
        _assert_same(next(it_new), next(it_old), task.images)
        assert new.position == old.position
    # a run resumed from the position continues with the batches that followed, making none before them
    pos = dict(new.position)
    resumed = _task(data, workers).train_batches().endless(pos)
    for _ in range(3):
        _assert_same(next(resumed), next(it_old), task.images)
    for b_new, b_old in zip(new, old):  # one pass, as a plain iterable
        _assert_same(b_new, b_old, task.images)
    # two ranks with half the batch: each rank's batches are today's shard
    half = _task(data, workers, batch_size=2)
    for rank in range(2):
        shard, ref = half.train_batches().shard(rank, 2), _today(half, 2).shard(rank, 2)
        it_s, it_r = shard.endless(), ref.endless()
        for _ in range(4):
            _assert_same(next(it_s), next(it_r), half.images)
            assert shard.position == ref.position


def test_workers_give_the_same_batches_as_no_workers(data):
    zero, two = _task(data, 0).train_batches(), _task(data, 2).train_batches()
    it0, it2 = zero.endless(), two.endless()
    for _ in range(5):
        a, b = next(it0), next(it2)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
        assert zero.position == two.position


def test_workers_give_the_same_evaluation_as_no_workers(data):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    assert _task(data, 0).evaluate(model, "test") == _task(data, 2).evaluate(model, "test")


def test_an_unreadable_image_in_a_worker_is_one_line(data, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    store = ImageStore(Preprocessor(None, get_adapter("vit").image_processor(16)), workers=2)
    with pytest.raises(DataError, match=r"^image .*bad\.jpg cannot be read") as err:
        list(store.stream([[bad]], CPU))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="workers must be 0"):
        ImageStore(store.prep, workers=-1)


# ---- bounded memory -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    rng = random.Random(0)
    paths = []
    for i in range(300):
        paths.append(root / f"{i:03d}.bmp")  # quick to write
        Image.new("RGB", (20, 20), tuple(rng.randrange(256) for _ in range(3))).save(paths[-1])
    return paths


def test_the_uint8_cache_stays_under_its_cap(many):
    prep = Preprocessor(None, get_adapter("vit").image_processor(16))
    per_image = 3 * 16 * 16  # uint8
    cap = 100 * per_image + 17
    store = ImageStore(prep, workers=0, cache_gb=cap / 2**30)
    groups = [many[s : s + 32] for s in range(0, len(many), 32)]
    for _ in range(2):
        assert sum(len(px) for px in store.stream(groups, CPU)) == len(many)
        cache = store.dataset.cache
        assert cache.bytes <= cap and cache.bytes == per_image * len(cache.items) == per_image * 100
        assert all(px.dtype == torch.uint8 for px in cache.items.values())
    off = ImageStore(prep, workers=0, cache_gb=0)
    list(off.stream(groups, CPU))
    assert off.dataset.cache.bytes == 0


def test_by_default_a_large_set_is_not_cached(many, monkeypatch):
    monkeypatch.setattr(pipeline, "SMALL_SET", 100)
    monkeypatch.setattr("upop.tasks.base.SMALL_SET", 100)
    store = ImageStore(Preprocessor(None, get_adapter("vit").image_processor(16)), workers=0)
    list(store.stream([many], CPU))
    assert store.dataset.cache.bytes == 0
    list(store.stream([many[:50]], CPU))  # a small one is
    assert len(store.dataset.cache.items) == 50


def test_default_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert pipeline.default_workers() == 7 and pipeline.default_workers(10) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pipeline.default_workers() == 8
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert pipeline.default_workers() == 0


def test_compact_moves_uneven_shares_together_in_place():
    counts, per = [3, 1, 0, 3, 2], 3
    buf = torch.full((len(counts) * per, 2), -1.0)
    expected = []
    for r, n in enumerate(counts):
        rows = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 2) + 10 * r
        buf[r * per : r * per + n] = rows
        expected.append(rows)
    out = _compact(buf, counts, per)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, torch.cat(expected))
