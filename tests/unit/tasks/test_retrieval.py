"""Retrieval training as BLIP / CLIP / SigLIP train it (one process here; two ranks in test_distributed.py):
the dual encoders' own losses with their learnable scale, BLIP's hard negatives, k_test, distillation terms."""

import shutil
from collections import Counter

import pytest
import torch
from torch.nn import functional as F

import upop
from upop.adapters import get_adapter
from upop.datasets import shapes
from upop.models.demo import build_tokenizer
from upop.errors import ConfigError
from upop.training.retrain import retrain
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


def test_blip_negatives_depend_on_the_batch_and_step_not_on_how_often_it_runs(data):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()  # no dropout: only the draws differ
    task = _task("blip", model, data, momentum=False)
    task.train_begin(model, None)
    batch = {**_batch(task, model, n=4), "image_id": torch.tensor([0, 1, 2, 3])}
    first = task.forward(model, batch)
    again = task.forward(model, batch)  # DDP's first-batch probe runs a batch twice
    assert torch.equal(first["neg_img"], again["neg_img"]) and torch.equal(first["neg_txt"], again["neg_txt"])
    draws = set()
    for _ in range(8):
        task.train_after_step(model)
        draws.add(tuple(task.forward(model, batch)["neg_img"].tolist()))
    assert len(draws) > 1  # another step draws anew
    resumed = _task("blip", model, data, momentum=False)
    resumed.train_begin(model, task.train_state())
    assert torch.equal(resumed.forward(model, batch)["neg_img"], task.forward(model, batch)["neg_img"])


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


def _search_cfg(steps=4):
    return upop.SearchConfig(ratio=0.5, steps=steps, update_every=2, lr=1e-3)


def test_momentum_model_follows_the_ema_rule_and_fills_the_queue(data):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).train()
    task = _task("blip", model, data, batch_size=4)
    task.train_begin(model, None)
    mom = task._momentum
    assert mom.mu == 0.995 and mom.queue.size == 24  # capped at the 24 training pairs (8 images, 3 captions each)
    before = {n: p.detach().clone() for n, p in mom.model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    task.train_after_step(model)
    for n, p in mom.model.named_parameters():
        theta = dict(model.named_parameters())[n]
        assert torch.allclose(p, 0.995 * before[n] + 0.005 * theta, atol=1e-6), n
    # the loop calls the hooks: after two steps two batches' momentum features are queued and α has risen
    retrain(model, task.loss, task.train_batches(), upop.RetrainConfig(epochs=1, steps_per_epoch=2, lr=1e-3))
    # α rises over the first epoch: 24 pairs / batch 4 = 6 steps
    mom = task._momentum
    assert mom.batches == 2 and mom.queue.filled == 24 and mom.alpha == pytest.approx(0.4 * 2 / 6)
    assert (mom.queue.ids >= 0).sum() == 8  # two batches' features replaced 8 of the queue's random rows
    out = task.forward(model, next(iter(task.train_batches())))
    assert out["mom_i2t"].shape == (4, 4 + 24)  # the batch's momentum features, then the queue
    assert torch.allclose(out["mom_i2t_targets"].sum(1), torch.ones(4), atol=1e-5)


def test_momentum_model_is_masked_with_the_same_zeta_on_request_and_rebuilt_from_the_slim_student(data):
    from upop.pruning.masks import MaskSet, masks_of
    from upop.pruning.search import search
    from upop.pruning.slim import slim_model

    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).train()
    adapter = get_adapter("blip")
    specs = adapter.modules(model)
    task = _task("blip", model, data, batch_size=4, momentum_masked=True)
    masks = MaskSet(model, specs, "dim")
    task.train_begin(model, None)
    copy = task._momentum.model_for(model)
    assert masks_of(copy) is masks
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unmasked = adapter.encode_image(copy, px)[1]
        masks[specs[1].name].zero_()  # the student's ζ, changed in place: the copy follows
        masked = adapter.encode_image(copy, px)[1]
        assert not torch.allclose(masked, unmasked, atol=1e-4)
        assert torch.allclose(masked, adapter.encode_image(model, px)[1], atol=1e-6)
    masks.remove()
    assert masks_of(copy) is None
    with torch.no_grad():
        assert torch.allclose(adapter.encode_image(copy, px)[1], unmasked, atol=1e-6)
    res = search(model, specs, task.loss, task.train_batches(), _search_cfg())
    slim_model(model, specs, res.kept, "dim", adapter, zeta=res.zeta)
    retrain(model, task.loss, task.train_batches(), upop.RetrainConfig(epochs=1, steps_per_epoch=1, lr=1e-3))
    shapes_of = lambda m: {n: p.shape for n, p in m.named_parameters()}  # noqa: E731
    assert shapes_of(task._momentum.model) == shapes_of(model)


@pytest.mark.parametrize("momentum", [True, False], ids=["momentum", "no-momentum"])
def test_resume_mid_search_with_momentum_equals_an_uninterrupted_run(data, tmp_path, monkeypatch, momentum):
    from upop.tasks.retrieval import BlipRetrieval

    def cfg():
        return upop.CompressConfig(ratio=0.5, search=_search_cfg(6), retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=2,
                                                                                                lr=1e-3))

    def run(**kw):
        model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
        prep = Preprocessor(build_tokenizer(), get_adapter("blip").image_processor(32))
        return upop.compress(model, cfg(), data=data, task="retrieval", preprocessor=prep, batch_size=4,
                             latency=False, task_options={"momentum": momentum}, **kw)

    ref = run()
    real, calls = BlipRetrieval.forward, []

    def interrupting(self, model, batch, guide=None):
        calls.append(1)
        if len(calls) == 4:  # inside the 4th search step: 3 finished, the queue and α under way
            raise KeyboardInterrupt
        return real(self, model, batch, guide)

    monkeypatch.setattr(BlipRetrieval, "forward", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(state_dir=tmp_path / "s")
    monkeypatch.setattr(BlipRetrieval, "forward", real)
    saved = torch.load(tmp_path / "s" / "state.pt", weights_only=True)
    assert saved["phase"] == "search" and saved["search"]["loss_state"].get("batches", 3 if momentum else None) == \
        (3 if momentum else None)
    res = run(state_dir=tmp_path / "s", resume=True)
    assert res.search.kept == ref.search.kept
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(v, res.model.state_dict()[k], atol=1e-6), k


def test_momentum_options_are_checked_and_off_means_no_momentum_state(data):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    with pytest.raises(ConfigError, match="momentum must be true or false"):
        _task("blip", model, data, momentum="yes").train_begin(model, None)
    with pytest.raises(ConfigError, match="queue_size must be an integer >= 1"):
        _task("blip", model, data, queue_size=0).train_begin(model, None)
    task = _task("blip", model, data, momentum=False)
    task.train_begin(model, None)
    assert set(task.train_state()) == {"steps"}
    short = _task("blip", model, data, queue_size=3)
    short.train_begin(model, None)
    assert short._momentum.queue.size == 3  # a queue shorter than the training set is kept as asked


def test_demo_blip_reranks_its_own_depth_with_or_without_a_data_folder():
    from upop.api import open_model, setup_task
    from upop.models.demo import shapes_dir

    src = open_model("demo-blip", None)
    for data in (None, shapes_dir()):  # the benchmarks pass the shapes folder; compress leaves it to the demo
        assert setup_task(src, None, data, None, 8, 0).task.k_test("test") == 16
    assert setup_task(src, None, None, None, 8, 0, k_test=4).task.k_test("test") == 4  # the caller's wins


def _blip_sequences(data, images: int):
    """A tiny BLIP retrieval model, its task (chunks of 2) and the image sequences of ``images`` random images."""
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()
    task = _task("blip", model, data, eval_batch_size=2)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        seq, _ = task.adapter.encode_image(model, torch.randn(images, 3, size, size,
                                                              generator=torch.Generator().manual_seed(0)))
    return model, task, seq


def test_re_ranked_scores_are_assembled_on_the_host_matrix_device(data, monkeypatch):
    """One process: the pairs and their scores come from the model's device and must move to the host matrix's
    (a single-GPU evaluation crashed indexing a CPU matrix with CUDA rows). The matrix is put on ``meta`` here,
    so rows that stay where they were computed show."""
    from upop.tasks import retrieval

    from ...gpuless import observe_devices

    model, task, seq = _blip_sequences(data, 3)
    sim = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    pairs = retrieval._pairs(sim.topk(2, dim=1).indices, 0, rows_are_images=True)
    monkeypatch.setattr(retrieval, "HOST", torch.device("meta"))
    with observe_devices() as seen, torch.no_grad():
        (scores,) = task._rerank(model, sim, [(0, seq[:2]), (2, seq[2:])], task.prep.text(["a", "b c", "d", "e f g"]),
                                 [pairs])
    assert scores.device.type == "meta" and scores.shape == sim.shape
    assert ("cat", "cpu", "meta") in seen


def test_a_chunk_of_images_in_no_pair_is_skipped(data):
    """Text → image pairs come from each text's top-k images: a chunk of images that no text ranks high has none
    (a single-GPU evaluation of a BLIP-base-sized random model crashed on it: the text encoder got 0 rows). Its
    rows stay -1e4 and the other chunk's pairs are scored as when it is alone."""
    from upop.tasks import retrieval

    model, task, seq = _blip_sequences(data, 4)
    sim = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    sim[2:] -= 10  # images 2 and 3 (the second chunk) are in no text's top 2
    pairs = retrieval._pairs(sim.topk(2, dim=0).indices.t(), 0, rows_are_images=False)
    assert set(pairs[:, 0].tolist()) == {0, 1}
    tokens = task.prep.text(["a", "b c", "d"])
    with torch.no_grad():
        (both,) = task._rerank(model, sim, [(0, seq[:2]), (2, seq[2:])], tokens, [pairs])
        (alone,) = task._rerank(model, sim, [(0, seq[:2])], tokens, [pairs])
    assert torch.equal(both, alone)
    assert (both[2:] == -1e4).all() and (both[:2] > -1e4).sum() == len(pairs)


def test_evaluation_holds_one_chunk_of_image_sequences_in_the_compute_dtype(data, monkeypatch):
    """BLIP's ITM input (every image's full sequence) is re-encoded one ``eval_batch_size`` chunk at a time rather
    than kept for the whole split, in the compute dtype (bf16 under autocast on a GPU; forced here on the CPU);
    the recalls are those of one chunk holding all."""
    from upop.tasks import retrieval

    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()
    whole = _task("blip", model, data, eval_batch_size=64).evaluate(model, "test")
    held: list[tuple[int, torch.dtype]] = []
    real = retrieval.BlipRetrieval._sequences

    def spy(self, *args):
        for first, seq in real(self, *args):
            held.append((len(seq), seq.dtype))
            yield first, seq

    monkeypatch.setattr(retrieval.BlipRetrieval, "_sequences", spy)
    chunked = _task("blip", model, data, eval_batch_size=2).evaluate(model, "test")
    assert [n for n, _ in held] == [2, 2, 2]  # 6 test images, never more than a chunk at once
    assert chunked == pytest.approx(whole, abs=1e-6)
    held.clear()
    monkeypatch.setattr(retrieval, "amp_dtype", lambda device, enabled: torch.bfloat16)
    low = _task("blip", model, data, eval_batch_size=2).evaluate(model, "test")
    assert {d for _, d in held} == {torch.bfloat16} and low.keys() == whole.keys()
    assert all(v == v for v in low.values())  # no NaN
    held.clear()
    monkeypatch.setattr(retrieval, "amp_dtype", lambda device, enabled: torch.bfloat16 if enabled else None)
    task = _task("blip", model, data, eval_batch_size=2)
    task.amp = False  # a run without AMP (SearchConfig.amp) evaluates without it too
    assert task.evaluate(model, "test") == pytest.approx(whole, abs=1e-6) and {d for _, d in held} == {torch.float32}


# ---- the reference's epoch and its in-batch duplicates (independent ports of sdc17/UPop's formulas) ------------
def _reference_epoch(annotation: list[tuple[int, str]], batch_size: int, seed: int) -> list[list[int]]:
    """The reference's training loader: its dataset is the annotation list (one item per (image, caption)
    pair), shuffled by a DistributedSampler and cut into batches with drop_last=True."""
    sampler = torch.utils.data.DistributedSampler(range(len(annotation)), num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = torch.utils.data.DataLoader(range(len(annotation)), batch_size=batch_size, sampler=sampler, drop_last=True)
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("task_name,class_name", [("retrieval", "BlipForImageTextRetrieval"),
                                                  ("caption", "BlipForConditionalGeneration")])
def test_an_epoch_is_every_image_caption_pair_once(data, task_name, class_name):
    import json

    model = build_tiny("blip", class_name, vocab=99)
    adapter = get_adapter("blip")
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32))
    task = make_task(adapter, task_name, prep, data, model=model, batch_size=5)
    annotation = [(r["image"], r["caption"]) for r in json.loads((data / "retrieval_train.json").read_text())]
    assert len(annotation) == 24  # 8 images, 3 captions each
    batches = task.train_batches()
    assert len(batches) == len(_reference_epoch(annotation, 5, 0)) == 24 // 5
    if task_name == "caption":  # 20 of the 24 captions, none more often than the file holds it
        seen = Counter(c for b in batches for c in b["captions"])
        assert sum(seen.values()) == 20 and not seen - Counter(c for _i, c in annotation)
    else:  # every pair once: its (image, caption) never twice, and only pairs of the file
        pairs = []
        for b in task.train_batches():
            pairs += list(zip(b["image_id"].tolist(), b["pair_id"].tolist()))
        assert len(pairs) == 20 and len({p for _i, p in pairs}) == 20
        recs = task._records("train")
        for image, pair in pairs:
            assert annotation[pair][0] == recs[image].image.relative_to(data).as_posix()


def _reference_itc(sim_i2t, sim_t2i, idx, idx_all):
    """BLIP's ITC targets and loss (models/blip_retrieval.py): every column of the same idx is a positive."""
    idx = idx.view(-1, 1)
    pos_idx = torch.eq(idx, idx_all.view(1, -1)).float()
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
    return sim_targets, (loss_i2t + loss_t2i) / 2


def _reference_negative_weights(sim, idx, idxs):
    """BLIP's hard-negative weights: softmax over the gathered batch, 0 where the idx is the row's own."""
    mask = torch.eq(idx.view(-1, 1), idxs.view(1, -1))
    return F.softmax(sim, dim=1).masked_fill(mask, 0)


def test_in_batch_captions_of_one_image_are_itc_positives_and_never_hard_negatives(data):
    from upop.tasks.retrieval import _negative_weights

    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()
    task = _task("blip", model, data, momentum=False)
    task.train_begin(model, None)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    batch = {**_batch(task, model, n=6), "image_id": ids, "pair_id": torch.arange(6)}
    out = task.forward(model, batch)
    targets, ref_itc = _reference_itc(out["i2t"], out["t2i"], ids, ids)
    assert torch.allclose(out["itc_targets"], targets)
    labels = torch.cat([torch.ones(6), torch.zeros(12)]).long()
    assert torch.allclose(task.loss_from(out, batch), ref_itc + F.cross_entropy(out["itm"], labels), atol=1e-6)
    same = ids[:, None] == ids[None, :]
    for sim in (out["i2t"], out["t2i"]):
        assert torch.allclose(_negative_weights(sim, same), _reference_negative_weights(sim, ids, ids), atol=1e-8)
    for step in range(20):
        task._steps = step
        drawn = task.forward(model, batch)
        assert not (ids[drawn["neg_img"]] == ids).any() and not (ids[drawn["neg_txt"]] == ids).any()
    # without duplicates the targets are the diagonal: the plain cross-entropy of before
    distinct = {**batch, "image_id": torch.arange(6)}
    out = task.forward(model, distinct)
    diag = torch.arange(6)
    itc = (F.cross_entropy(out["i2t"], diag) + F.cross_entropy(out["t2i"], diag)) / 2
    assert torch.allclose(task.loss_from(out, distinct), itc + F.cross_entropy(out["itm"], labels), atol=1e-6)


def _reference_itm_score(model, image_embeds, input_ids, attention_mask):
    """BLIP's evaluation score of one (image, text) pair before the ITC similarity is added
    (models/blip_retrieval.py evaluation): the ITM head's positive-class output, no softmax."""
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
    output = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, return_dict=True)
    return model.itm_head(output.last_hidden_state[:, 0, :])[:, 1]


def _enc_tokenizer():
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})  # as BLIP's init_tokenizer adds it
    return tok


@pytest.mark.parametrize("rule", ["logit", "prob", None])
@pytest.mark.parametrize("with_enc", [True, False], ids=["enc", "no-enc"])
def test_reranking_adds_the_raw_itm_logit_by_default_with_enc_as_the_first_token(data, rule, with_enc):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()
    adapter = get_adapter("blip")
    tok = _enc_tokenizer() if with_enc else build_tokenizer()
    prep = Preprocessor(tok, adapter.image_processor(32))
    task = make_task(adapter, "retrieval", prep, data, model=model, **({} if rule is None else {"rerank": rule}))
    recs = task._records("test")
    texts = [c for r in recs for c in r.captions]
    tokens = prep.text(texts)
    with torch.no_grad():
        seq, img = adapter.encode_image(model, task.images.get([r.image for r in recs]))
        sim = img @ adapter.encode_text(model, **tokens).t()
        pairs = torch.tensor([[0, 0], [1, 4], [5, 2], [3, 17]])
        (got,) = task._rerank(model, sim, [(0, seq)], tokens, [pairs])
        ids = tokens["input_ids"].clone()
        if with_enc:  # encoder_input_ids[:, 0] = tokenizer.enc_token_id
            ids[:, 0] = tok.convert_tokens_to_ids("[ENC]")
        for i, t in pairs.tolist():
            score = _reference_itm_score(model, seq[i : i + 1], ids[t : t + 1], tokens["attention_mask"][t : t + 1])
            if rule == "prob":
                logits = adapter.itm_logits(model, seq[i : i + 1], ids[t : t + 1], tokens["attention_mask"][t : t + 1])
                score = F.softmax(logits, dim=1)[:, 1]
            assert torch.allclose(got[i, t], score[0] + sim[i, t], atol=1e-5), (i, t)
    assert float(got[0, 1]) == -1e4  # a pair outside the top-k


def test_itm_training_input_starts_with_enc_where_the_tokenizer_has_it(data):
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).train()
    adapter = get_adapter("blip")
    task = make_task(adapter, "retrieval", Preprocessor(_enc_tokenizer(), adapter.image_processor(32)), data, model=model,
                     momentum=False)
    seen = []
    real = adapter.itm_logits
    adapter.itm_logits = lambda m, seq, ids, mask: seen.append(ids) or real(m, seq, ids, mask)
    try:
        task.forward(model, _batch(task, model, n=4))
    finally:
        del adapter.itm_logits
    enc = task.prep.tokenizer.convert_tokens_to_ids("[ENC]")
    # the positives with the negative images, then the negative texts: 3 rows per image, every one led by [ENC]
    assert len(seen) == 2 and all((ids[:, 0] == enc).all() for ids in seen) and sum(len(ids) for ids in seen) == 12
    with pytest.raises(ConfigError, match="rerank must be one of logit, prob"):
        make_task(adapter, "retrieval", task.prep, data, model=model, rerank="softmax").rerank()


def test_the_search_momentum_encoder_is_dense_and_the_ema_of_the_students_weights(data):
    """The reference builds its momentum encoder without masks: during the search it computes the unpruned
    function of m, where m_0 = θ_0 and m_t = 0.995·m_(t−1) + 0.005·θ_t after every optimizer step."""
    from upop.pruning.masks import MaskSet, masks_of
    from upop.pruning.search import search

    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).train()
    adapter = get_adapter("blip")
    specs = adapter.modules(model)
    task = _task("blip", model, data, batch_size=4)
    thetas = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    real = task.train_after_step
    task.train_after_step = lambda m: thetas.append({n: p.detach().clone() for n, p in m.named_parameters()}) or real(m)
    seen = []
    real_itc = task._momentum_itc

    def spy(mom, student, *args):
        copy = mom.model_for(student)
        seen.append((masks_of(student) is not None, masks_of(copy)))
        return real_itc(mom, student, *args)

    task._momentum_itc = spy
    search(model, specs, task.loss, task.train_batches(), _search_cfg(5))
    assert len(seen) == 5 and all(student_masked and copy_masks is None for student_masked, copy_masks in seen)
    ema = dict(thetas[0])
    for theta in thetas[1:]:
        ema = {n: 0.995 * ema[n] + 0.005 * theta[n] for n in ema}
    assert len(thetas) == 6
    for n, p in task._momentum.model.named_parameters():
        assert torch.allclose(p, ema[n], atol=1e-6), n
    # with the student's masks on (a fresh search), the copy still computes the dense function of its weights
    masks = MaskSet(model, specs, "dim")
    with torch.no_grad():
        masks[specs[1].name].zero_()
        copy = task._momentum.model_for(model)
        px = torch.randn(2, 3, 32, 32)
        dense = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()
        dense.load_state_dict(copy.state_dict())
        assert torch.allclose(adapter.encode_image(copy.eval(), px)[1], adapter.encode_image(dense, px)[1], atol=1e-6)
    masks.remove()


def test_the_queue_starts_as_blips_random_unit_vectors_in_the_itc_softmax(data):
    """BLIP's queue: normalize(randn(embed_dim, queue_size), dim=0), idx −100; at the first step (α = 0) the
    targets are the idx positives and every queue column is in the softmax."""
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).eval()
    task = _task("blip", model, data, batch_size=4)
    task.train_begin(model, None)
    ids = torch.tensor([0, 0, 1, 2])
    batch = {**_batch(task, model, n=4), "image_id": ids, "pair_id": torch.arange(4)}
    out = task.forward(model, batch)
    q = task._momentum.queue
    assert q.filled == q.size == 24 and bool((q.ids == -100).all())
    assert torch.allclose(q.img.norm(dim=1), torch.ones(24)) and torch.allclose(q.txt.norm(dim=1), torch.ones(24))
    assert not torch.allclose(q.img, q.txt)  # two draws, as BLIP's two buffers
    with torch.no_grad():  # the reference's loss with the momentum model = the model (no step yet)
        adapter = task.adapter
        img = adapter.encode_image(model, batch["pixel_values"])[1]
        txt = adapter.encode_text(model, batch["input_ids"], batch["attention_mask"])
        idx_all = torch.cat([ids, torch.full((24,), -100)])
        targets, _ = _reference_itc(torch.zeros(4, 28), torch.zeros(4, 28), ids, idx_all)
        sim_i2t = img @ torch.cat([txt, q.txt]).t() / 0.07
        sim_t2i = txt @ torch.cat([img, q.img]).t() / 0.07
        ref = (-(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean() - (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()) / 2
    assert torch.allclose(out["mom_i2t_targets"], targets, atol=1e-6)
    labels = torch.cat([torch.ones(4), torch.zeros(8)]).long()
    assert torch.allclose(task.loss_from(out, batch), ref + F.cross_entropy(out["itm"], labels), atol=1e-5)
    empty = _task("blip", model, data, batch_size=4, queue_init="empty")
    empty.train_begin(model, None)
    assert empty.forward(model, batch)["mom_i2t"].shape == (4, 4)  # the earlier start: an empty queue
    with pytest.raises(ConfigError, match="queue_init must be one of random, empty"):
        _task("blip", model, data, queue_init="zeros").train_begin(model, None)


def test_blips_itc_temperature_learns_within_its_clamp_and_is_saved_with_the_slim_checkpoint(data, tmp_path):
    """The reference: ``self.temp = nn.Parameter(0.07 * torch.ones([]))``, ``with torch.no_grad():
    self.temp.clamp_(0.001, 0.5)`` at the start of each training forward, every similarity divided by it."""
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99).train()
    task = _task("blip", model, data, momentum=False)
    assert model.itc_temp.item() == pytest.approx(0.07) and model.itc_temp.requires_grad
    batch = _batch(task, model, n=4)
    for start, clamped in ((0.9, 0.5), (1e-5, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            model.itc_temp.fill_(start)
        out = task.forward(model, batch)
        assert model.itc_temp.item() == pytest.approx(clamped)
        with torch.no_grad():
            img = task.adapter.encode_image(model, batch["pixel_values"])[1]
            txt = task.adapter.encode_text(model, batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(out["i2t"], img @ txt.t() / clamped, atol=1e-4)
    task.loss_from(out, batch).backward()
    assert model.itc_temp.grad is not None and float(model.itc_temp.grad) != 0.0
    fixed = build_tiny("blip", "BlipForImageTextRetrieval", seed=1, vocab=99)
    del fixed._parameters["itc_temp"]
    _task("blip", fixed, data, learn_temperature=False)
    assert not hasattr(fixed, "itc_temp")  # fixed at the temperature option: nothing to learn or save

    def cfg():
        return upop.CompressConfig(ratio=0.5, search=_search_cfg(3), retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=2,
                                                                                                lr=1e-2))

    prep = Preprocessor(build_tokenizer(), get_adapter("blip").image_processor(32))
    res = upop.compress(build_tiny("blip", "BlipForImageTextRetrieval", vocab=99), cfg(), data=data, task="retrieval",
                        preprocessor=prep, batch_size=4, latency=False)
    learned = res.model.itc_temp.item()
    assert learned != pytest.approx(0.07, abs=1e-6) and 0.001 <= learned <= 0.5
    loaded = upop.load(res.save(tmp_path / "slim"))
    assert loaded.itc_temp.item() == learned
    old = {k: v for k, v in loaded.state_dict().items() if k != "itc_temp"}  # weights of an earlier upop
    loaded.load_state_dict(old, strict=True)
    assert loaded.itc_temp.item() == pytest.approx(0.07)


@pytest.mark.parametrize("family,class_name", [("clip", "CLIPModel"), ("siglip", "SiglipModel")])
def test_dual_encoders_leave_another_caption_of_the_same_image_out_of_their_loss(family, class_name, data):
    model = build_tiny(family, class_name, vocab=99).train()
    task = _task(family, model, data)
    ids = torch.tensor([0, 0, 1, 2])
    batch = {**_batch(task, model), "image_id": ids, "pair_id": torch.arange(4)}
    out = task.forward(model, batch)
    loss = task.loss_from(out, batch)
    rows = []
    for i in range(4):  # each row without the columns of its image's other captions
        keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
        target = keep.index(i)
        i2t, t2i = out["i2t"][i, keep], out["t2i"][i, keep]
        if family == "clip":
            rows.append((F.cross_entropy(i2t[None], torch.tensor([target])) +
                         F.cross_entropy(t2i[None], torch.tensor([target]))) / 2)
        else:
            sign = -torch.ones(len(keep))
            sign[target] = 1.0
            rows.append(-F.logsigmoid(sign * t2i).sum())
    assert torch.allclose(loss, torch.stack(rows).mean(), atol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    distinct = {**batch, "image_id": torch.arange(4)}  # no duplicates: the model's own loss, as before
    assert torch.allclose(task.loss(model, distinct), task.adapter.native_loss(model, _batch(task, model)), atol=1e-5)
