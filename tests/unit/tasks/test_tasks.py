"""Every task runs a search step and a retrain step, and evaluates, on a tiny model of each family."""

import pytest
import torch

import upop
from upop.adapters import get_adapter
from upop.datasets import shapes
from upop.datasets.readers import DataError
from upop.models.demo import build_tokenizer
from upop.errors import UnsupportedModelError
from upop.tasks import Preprocessor, make_task

from ...conftest import build_tiny

CASES = [
    ("blip", "BlipForImageTextRetrieval", "retrieval", "r_mean"),
    ("blip", "BlipForConditionalGeneration", "caption", "cider"),
    ("blip", "BlipForQuestionAnswering", "vqa", "vqa_acc"),
    ("clip", "CLIPModel", "retrieval", "r_mean"),
    ("siglip", "SiglipModel", "retrieval", "r_mean"),
    ("vit", "ViTForImageClassification", "classification", "top1"),
    ("deit", "DeiTForImageClassification", "classification", "top1"),
    ("blip_nlvr", "BlipNlvrForVisualReasoning", "nlvr", "acc"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("t") / "shapes", train=8, val=4, test=4, classification_per_class=(1, 1, 1))


def prep_for(family, model):
    adapter = get_adapter(family)
    return Preprocessor(build_tokenizer(), adapter.image_processor(32), **adapter.preprocessor_options(model))


@pytest.mark.parametrize("family,class_name,task,primary", CASES, ids=[c[1] for c in CASES])
def test_each_task_searches_retrains_and_evaluates(family, class_name, task, primary, data):
    sizes = {"vocab": 99}
    model = build_tiny(family, class_name, **sizes)
    if task == "classification":
        model.config.num_labels = 5  # fewer than the 12 data classes: refused with a message
        with pytest.raises(DataError, match="the model has 5 classes, the data has 12"):
            make_task(get_adapter(family), task, prep_for(family, model), data, model=model).train_batches()
        model = build_tiny(family, class_name, **sizes)
        model.classifier = torch.nn.Linear(model.classifier.in_features, 12)
        model.config.id2label = {i: f"LABEL_{i}" for i in range(12)}
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=1, update_every=1, lr=1e-4),
                              retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=1, lr=1e-4))
    res = upop.compress(model, cfg, data=data, task=task, preprocessor=prep_for(family, model), batch_size=4)
    m = res.report.metrics
    assert m["primary"] == primary and res.report.task == task
    for when in ("before", "after"):
        assert m[when]["primary"] == m[when][primary] and 0.0 <= m[when][primary] <= 1000.0
    assert res.report.params["after"]["total"] < res.report.params["before"]["total"]


def test_zero_shot_classification_with_a_dual_encoder(data):
    model = build_tiny("clip", "CLIPModel")
    t = make_task(get_adapter("clip"), "classification", prep_for("clip", model), data, model=model)
    r = t.evaluate(model, "test")
    assert set(r) == {"top1", "top5", "primary"}
    with pytest.raises(DataError, match="zero-shot classification is an evaluation"):
        t.train_batches()


def test_a_task_the_model_cannot_do(data):
    model = build_tiny("blip", "BlipForConditionalGeneration")
    with pytest.raises(UnsupportedModelError, match="cannot do task 'retrieval'"):
        make_task(get_adapter("blip"), "retrieval", prep_for("blip", model), data, model=model)
    with pytest.raises(UnsupportedModelError, match="vit models cannot do task 'caption'"):
        make_task(get_adapter("vit"), "caption", prep_for("vit", model), data)


def test_missing_data_folder_and_split(tmp_path):
    model = build_tiny("vit", "ViTForImageClassification")
    t = make_task(get_adapter("vit"), "classification", prep_for("vit", model), tmp_path / "nope", model=model)
    with pytest.raises(DataError, match="data folder .*nope does not exist"):
        t.train_batches()
    (tmp_path / "cls").mkdir()
    t = make_task(get_adapter("vit"), "classification", prep_for("vit", model), tmp_path / "cls", model=model)
    with pytest.raises(DataError, match="no train split for classification"):
        t.train_batches()
    model = build_tiny("clip", "CLIPModel")
    t = make_task(get_adapter("clip"), "retrieval", prep_for("clip", model), tmp_path / "nope", model=model)
    with pytest.raises(DataError, match="does not exist"):
        t.train_batches()
    (tmp_path / "d").mkdir()
    t = make_task(get_adapter("clip"), "retrieval", prep_for("clip", model), tmp_path / "d", model=model)
    with pytest.raises(DataError, match="no train split for retrieval"):
        t.train_batches()


def test_nlvr_batches_hold_image_pairs_and_val_reads_a_dev_file(data, tmp_path):
    import shutil

    model = build_tiny("blip_nlvr", "BlipNlvrForVisualReasoning", vocab=99)
    t = make_task(get_adapter("blip_nlvr"), "nlvr", prep_for("blip_nlvr", model), data, model=model, batch_size=3)
    batch = next(iter(t.train_batches()))
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32) and batch["labels"].shape == (3,)
    res = t.evaluate(model, "test")
    assert 0 <= res["acc"] <= 100 and res["majority"] >= 50
    dev = tmp_path / "d"
    shutil.copytree(data, dev)
    (dev / "nlvr_val.json").rename(dev / "nlvr_dev.json")  # NLVR2 calls its validation split dev
    t2 = make_task(get_adapter("blip_nlvr"), "nlvr", prep_for("blip_nlvr", model), dev, model=model)
    assert t2.evaluate(model, "val")["acc"] == t.evaluate(model, "val")["acc"]


def test_vqa_trains_on_every_training_file_present(tmp_path):
    import shutil

    from ..datasets.test_readers import _vqa_folder

    root = _vqa_folder(tmp_path / "vqa", [("vqa_train", 2, False), ("vqa_val", 3, False), ("vg_qa", 4, True)])
    shutil.copy(root / "vqa_val.json", root / "vqa_test.json")
    model = build_tiny("blip", "BlipForQuestionAnswering", vocab=99)
    adapter = get_adapter("blip")
    task = make_task(adapter, "vqa", Preprocessor(build_tokenizer(), adapter.image_processor(32)), root, model=model,
                     batch_size=1)
    questions = [q for b in task.train_batches() for q in b["questions"]]
    assert sorted(questions) == sorted([f"q{i}?" for i in range(2)] + [f"v{i}?" for i in range(3)] +
                                       [f"g{i}?" for i in range(4)])
    assert root / "VG_100K" / "1.jpg" in task.image_paths("train")  # checked before a run, as the others


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("vqa") / "shapes", train=4, val=4, test=4, classification_per_class=(1, 1, 1))


@pytest.mark.parametrize("with_enc_token", [True, False], ids=["enc", "no-enc"])
def test_vqa_questions_start_with_enc_in_training_and_evaluation(vqa_data, with_enc_token):
    model = build_tiny("blip", "BlipForQuestionAnswering", vocab=99)
    adapter = get_adapter("blip")
    tok = build_tokenizer()
    if with_enc_token:
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})  # as BLIP's init_tokenizer adds it
    task = make_task(adapter, "vqa", Preprocessor(tok, adapter.image_processor(32)), vqa_data, model=model, batch_size=2)
    first = tok.convert_tokens_to_ids("[ENC]") if with_enc_token else tok.cls_token_id
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        batch = next(iter(task.train_batches()))
        task.forward(model.train(), {**batch, "pixel_values": torch.randn(2, 3, 32, 32)})
    finally:
        hook.remove()
    real = task.forwards.generate
    task.forwards.generate = lambda m, d, **x: seen.append(x["input_ids"]) or real(m, d, **x)
    task.evaluate(model.eval(), "test", limit=2)
    assert len(seen) >= 2 and all((ids[:, 0] == first).all() for ids in seen)
