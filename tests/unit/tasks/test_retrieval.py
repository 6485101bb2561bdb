"""Retrieval training as BLIP / CLIP / SigLIP train it (one process here; two ranks in test_distributed.py):
the dual encoders' own losses with their learnable scale, BLIP's hard negatives, k_test, distillation terms."""

import shutil

import pytest
import torch

import upop
from upop.adapters import get_adapter
from upop.datasets import shapes
from upop.demo import build_tokenizer
from upop.errors import ConfigError
from upop.retrain import retrain
from upop.tasks import Preprocessor, make_task

from ...conftest import build_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("r") / "shapes", train=8, val=4, test=6, classification_per_class=(1, 1, 1))


def _task(family, model, data, **options):
    adapter = get_adapter(family)
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32), **adapter.preprocessor_options(model))
    return make_task(adapter, "retrieval", prep, data, model=model, **options)


def _batch(task, model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    words = ["red circle", "a blue square on grey", "green", "small yellow triangle left", "two dots", "big star"]
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), **task.prep.text(words[:n])}


@pytest.mark.parametrize("family,class_name", [("clip", "CLIPModel"), ("siglip", "SiglipModel")])
def test_dual_encoder_loss_is_the_models_own_and_trains_its_scale(family, class_name, data):
    model = build_tiny(family, class_name, vocab=99).train()
    task = _task(family, model, data)
    batch = _batch(task, model)
    own = task.adapter.native_loss(model, {k: v for k, v in batch.items()})
    loss = task.loss(model, batch)
    assert torch.allclose(loss, own, atol=1e-5)
    learnable = ["logit_scale"] + (["logit_bias"] if family == "siglip" else [])
    loss.backward()
    for name in learnable:
        p = getattr(model, name)
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0
    before = {n: getattr(model, n).detach().clone() for n in learnable}
    retrain(model, task.loss, [batch], upop.RetrainConfig(epochs=1, steps_per_epoch=1, lr=1e-2))
    for name in learnable:  # in the optimizer: a step moves it
        assert not torch.equal(getattr(model, name).detach(), before[name]), name


def test_blip_hard_negatives_never_the_positive_and_a_teacher_reuses_them(data):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).train()
    task = _task("blip", model, data)
    batch = _batch(task, model, n=4)
    for seed in range(5):
        torch.manual_seed(seed)
        out = task.forward(model, batch)
        assert not (out["neg_img"] == torch.arange(4)).any() and not (out["neg_txt"] == torch.arange(4)).any()
        assert out["itm"].shape == (12, 2)
    teacher = build_tiny("blip", "BlipForImageTextRetrieval", seed=1, vocab=99)
    state = torch.get_rng_state()
    with torch.no_grad():
        t_out = task.forward(teacher, batch, guide=out)
    assert torch.equal(torch.get_rng_state(), state)  # the teacher draws nothing
    assert torch.equal(t_out["neg_img"], out["neg_img"]) and torch.equal(t_out["neg_txt"], out["neg_txt"])
    assert torch.isfinite(task.loss_from(out, batch))


@pytest.mark.parametrize("family,class_name", [("blip", "BlipForImageTextRetrieval"), ("clip", "CLIPModel")])
def test_distill_terms_zero_for_equal_outputs_positive_otherwise(family, class_name, data):
    model = build_tiny(family, class_name, vocab=99)
    task = _task(family, model, data)
    batch = _batch(task, model)
    with torch.no_grad():
        out = task.forward(model, batch)
        same = task.forward(model, batch, guide=out)
        other = task.forward(build_tiny(family, class_name, seed=3, vocab=99), batch, guide=out)
    assert float(task.distill_terms(out, same, 2.0)) == 0.0
    assert float(task.distill_terms(out, other, 2.0)) > 1e-6
    if family == "blip":  # the ITM term alone counts too
        itm_only = {**out, "itm": out["itm"] + torch.tensor([1.0, -1.0])}
        assert float(task.distill_terms(itm_only, out, 1.0)) > 1e-6


def _renamed(data, tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(data / f"retrieval_{split}.json", folder / f"{name}_{split}.json")
    return folder


def test_k_test_defaults_per_dataset_and_is_checked(data, tmp_path):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    assert _task("blip", model, _renamed(data, tmp_path, "coco_karpathy")).k_test("test") == 256
    assert _task("blip", model, _renamed(data, tmp_path, "flickr30k")).k_test("test") == 128
    assert _task("blip", model, data).k_test("test") == 256
    assert _task("blip", model, data, k_test=7).k_test("test") == 7
    for bad in (0, -2, 1.5, "8", True):
        with pytest.raises(ConfigError, match="k_test must be an integer >= 1"):
            _task("blip", model, data, k_test=bad).k_test("test")


def test_k_test_sets_the_itm_reranking_depth(data):
    """k=1 re-ranks one pair per image and per text; k above the split re-ranks every pair both ways."""
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    recs = _task("blip", model, data)._records("test")
    images, texts = len(recs), sum(len(r.captions) for r in recs)
    seen = {}
    for k in (1, 1000):
        task = _task("blip", model, data, k_test=k)
        real, scored = task._itm, []
        task._itm = lambda m, seq, ids, mask, real=real, scored=scored: scored.append(len(seq)) or real(m, seq, ids, mask)
        out = task.evaluate(model, "test")
        seen[k] = (sum(scored), out)
    assert seen[1][1]["k_test"] == 1.0 and seen[1000][1]["k_test"] == float(max(images, texts))
    assert seen[1][0] == images + texts
    assert seen[1000][0] == 2 * images * texts
