"""torch.distributed pieces on CPU with gloo: two processes with half the batch select what one
process with the whole batch selects; diverged masks are caught; evaluations gather in order."""

from __future__ import annotations

import random

import pytest
import torch
import torch.multiprocessing as mp

import upop
from upop.adapters import get_adapter
from upop.training.distributed import Dist, MaskDivergenceError, current, mask_digest
from upop.training.retrain import retrain
from upop.pruning.search import search
from upop.pruning.slim import slim_model
from upop.tasks.base import Batches

from ...conftest import build_tiny
from ...gpuless import blip_training_reads, observe_devices, run_ranks

N_ITEMS, BATCH = 16, 8


def _bank():
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    bank = adapter.example_inputs(model, batch_size=N_ITEMS, generator=torch.Generator().manual_seed(3))
    return {**bank, "labels": torch.arange(N_ITEMS) % model.config.num_labels}


def _loss(model, batch):
    """Cross-entropy with each item's own label: a per-item mean, so half batches average to the whole."""
    return torch.nn.functional.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])


def _batches(rank: int, world: int) -> Batches:
    bank = _bank()
    b = Batches(N_ITEMS, BATCH // world, lambda idx, rng: {k: v[idx] for k, v in bank.items()}, seed=0,
                drop_last=True)
    return b.shard(rank, world)


def _run(rank: int, world: int) -> dict:
    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    specs = adapter.modules(model)
    cfg = upop.SearchConfig(ratio=0.5, steps=6, update_every=2, lr=1e-3)
    res = search(model, specs, _loss, _batches(rank, world), cfg)
    slim_model(model, specs, res.kept, "dim", adapter, zeta=res.zeta)
    retrain(model, _loss, _batches(rank, world), upop.RetrainConfig(epochs=1, lr=1e-3))
    return {"kept": res.kept, "importance": res.importance, "pi": [h["pi"] for h in res.history],
            "loss": [h["task_loss"] for h in res.history],
            "logits": model.eval()(pixel_values=_bank()["pixel_values"]).logits.detach()}


def _blip_eval(folder: str, limit: int) -> dict:
    """BLIP retrieval (ITC + ITM re-ranking) evaluated on the first ``limit`` test images."""
    from upop.models.demo import build_tokenizer
    from upop.tasks import Preprocessor, make_task

    adapter = get_adapter("blip")
    model = build_tiny("blip", "BlipForImageTextRetrieval", vocab=99)
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32))
    task = make_task(adapter, "retrieval", prep, f"{folder}/d", model=model, eval_batch_size=2)
    with observe_devices():  # every gather returns its rows where asked
        return task.evaluate(model, "test", limit)


WORDS = ["red circle", "a blue square on grey", "green", "small yellow triangle at the left", "two dots",
         "big star", "a line", "grey on grey"]


def _retrieval_setup(family: str, class_name: str, folder: str):
    """A tiny retrieval model, its task, and a fixed bank of 8 images and captions (one token width)."""
    from upop.models.demo import build_tokenizer
    from upop.tasks import Preprocessor, make_task

    adapter = get_adapter(family)
    model = build_tiny(family, class_name, vocab=99).train()
    prep = Preprocessor(build_tokenizer(), adapter.image_processor(32), **adapter.preprocessor_options(model))
    task = make_task(adapter, "retrieval", prep, folder, model=model)
    size = model.config.vision_config.image_size
    bank = {"pixel_values": torch.randn(len(WORDS), 3, size, size, generator=torch.Generator().manual_seed(0)),
            **prep.text(WORDS)}
    return adapter, model, task, bank


def _itc_run(family: str, class_name: str, folder: str, rank: int, world: int) -> dict:
    """The retrieval loss on this rank's contiguous share of the bank (BLIP: its ITC part, as its ITM pairs are
    sampled), and the gradients averaged over the ranks as DDP averages them."""
    _adapter, model, task, bank = _retrieval_setup(family, class_name, folder)
    per = len(WORDS) // world
    batch = {k: v[rank * per : (rank + 1) * per] for k, v in bank.items()}
    out = task.forward(model, batch)
    out.pop("itm", None)
    loss = task.loss_from(out, batch)
    loss.backward()
    d = current()
    grads = {n: d.all_reduce_mean(p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return {"loss": float(d.all_reduce_mean(loss.detach())), "grads": grads}


def _negatives_run(folder: str, rank: int) -> dict:
    """One item per rank: each text's only negative image (and each image's only negative text) is the other
    rank's; the ITM scores the other rank's image sequence / caption."""
    adapter, model, task, bank = _retrieval_setup("blip", "BlipForImageTextRetrieval", folder)
    batch = {k: v[rank : rank + 1] for k, v in bank.items()}
    out = task.forward(model, batch)
    other = 1 - rank
    with torch.no_grad():
        seq = {i: adapter.encode_image(model, bank["pixel_values"][i : i + 1])[0] for i in (rank, other)}
        mine_other_img = adapter.itm_logits(model, seq[other], batch["input_ids"], batch["attention_mask"])
        mine_other_txt = adapter.itm_logits(model, seq[rank], bank["input_ids"][other : other + 1],
                                            bank["attention_mask"][other : other + 1])
    task.loss_from(out, batch).backward()
    vision_grad = sum(float(p.grad.abs().sum()) for p in model.vision_model.parameters() if p.grad is not None)
    return {"neg_img": out["neg_img"].tolist(), "neg_txt": out["neg_txt"].tolist(),
            "itm_neg_img": torch.allclose(out["itm"][1], mine_other_img[0], atol=1e-5),
            "itm_neg_txt": torch.allclose(out["itm"][2], mine_other_txt[0], atol=1e-5), "vision_grad": vision_grad}


def _uneven_gather_grad(d: Dist, n: int) -> tuple:
    """Rows 0..4 split 3 / 2; every rank's loss is sum((row index + 1) · gathered row): row i's gradient summed
    over the two ranks is 2 · (i + 1)."""
    start = list(d.shard(5))[0]
    x = torch.arange(start, start + n, dtype=torch.float32, requires_grad=True)
    rows, offset = d.cat_with_grad(x.unsqueeze(1))
    (rows.squeeze(1) * torch.arange(1.0, 6.0)).sum().backward()
    return offset, rows.squeeze(1).tolist(), x.grad.tolist(), x.tolist()


def _probe_rng(rank: int) -> dict:
    """The DDP runner's first call (a probe outside DDP, then the call through it) leaves the RNG where one plain
    call of the loss leaves it: a run resumed mid-way (which probes at another step) draws the same dropout."""
    from upop.training.distributed import loss_runner

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1)).train()

    def loss_fn(m, batch):
        return m(batch).pow(2).mean()

    batch = torch.ones(3, 4)
    torch.manual_seed(rank)
    loss_fn(model, batch)
    plain = torch.get_rng_state()
    torch.manual_seed(rank)
    loss_runner(model, loss_fn)(batch)
    return {"same_rng": torch.equal(torch.get_rng_state(), plain)}


def _worker(rank: int, world: int, folder: str, mode: str) -> None:
    from datetime import timedelta

    torch.set_num_threads(1)
    # A short timeout: a rank left out of a collective fails the test instead of hanging it.
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=60))
    try:
        if mode == "diverge" and rank == 1:
            import upop.pruning.search as s

            real = s.select_units

            def skewed(scores, table, share):  # this rank alone marks one more unit
                marked = real(scores, table, share)
                marked[int((~marked).nonzero()[0])] = True
                return marked

            s.select_units = skewed
        if mode == "gather":
            d = current()
            mine = list(d.shard(5))
            out = {"shard": mine, "cat": d.cat(torch.tensor(mine, dtype=torch.float32).reshape(-1, 1)).flatten().tolist(),
                   "concat": d.concat([f"r{rank}-{i}" for i in mine]),
                   # rows of any shape and dtype travel as tensors; a rank with none passes an empty one
                   "rows": d.cat(torch.full((2, 2, 3), 7.0, dtype=torch.float16) if rank else torch.empty(0)),
                   "none": d.cat(torch.empty(0)),
                   # token ids of another width per rank, padded on the right to the widest
                   "padded": d.cat_padded(torch.full((1, 2 + rank), 5, dtype=torch.long)),
                   # a training step's gathers: the same shape on every rank, padded to a width all know
                   "same": d.cat_same(torch.full((2, 1), float(rank))).flatten().tolist(),
                   "padded_to": d.cat_padded(torch.full((1, 2 + rank), 5, dtype=torch.long), width=4, same_rows=True),
                   "with_grad": _uneven_gather_grad(d, len(mine)),
                   "max": d.all_reduce_max(torch.tensor([float(rank)])).item(),
                   "mean": d.all_reduce_mean(torch.tensor([float(rank)], dtype=torch.float64)).item()}
        elif mode.startswith("itc:"):
            _mode, family, class_name = mode.split(":")
            out = _itc_run(family, class_name, folder, rank, world)
        elif mode == "negatives":
            out = _negatives_run(folder, rank)
        elif mode == "probe":
            out = _probe_rng(rank)
        elif mode.startswith("retrieval"):
            out = _blip_eval(folder, int(mode.split(":")[1]))
        else:
            out = _run(rank, world)
    except MaskDivergenceError as exc:
        out = {"error": str(exc)}
    finally:
        torch.distributed.destroy_process_group()
    torch.save(out, f"{folder}/rank{rank}.pt")


def _spawn(tmp_path, mode: str, world: int = 2) -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp_path), mode), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_two_processes_with_half_the_batch_select_what_one_process_selects(tmp_path):
    one = _run(0, 1)
    two = _spawn(tmp_path, "search")
    for r in two:
        assert r["kept"] == one["kept"]  # every rank, the same units as the single process
        assert r["pi"] == one["pi"]
        for name, imp in one["importance"].items():
            ref = torch.tensor(imp)  # float32 sums in another order: equal to ~1e-6 of the largest
            assert torch.allclose(torch.tensor(r["importance"][name]), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        # the logged loss is the mean over the ranks: the whole batch's loss
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-5)
        # DDP averages the gradients: retraining ends at the same function (weights differ only where
        # Adam scales float noise on zero gradients, as in key biases, which outputs do not see)
        assert torch.allclose(r["logits"], one["logits"], atol=1e-4)


def test_a_rank_whose_masks_diverge_is_detected(tmp_path):
    res = _spawn(tmp_path, "diverge")
    for r in res:  # every rank stops, and says which ranks disagree
        assert "error" in r, r.keys()
        assert "masks differ across ranks" in r["error"] and "ranks 0" in r["error"] and "ranks 1" in r["error"]
        assert "search step 2" in r["error"]


def test_collectives_keep_rank_order(tmp_path):
    res = _spawn(tmp_path, "gather")
    assert [r["shard"] for r in res] == [[0, 1, 2], [3, 4]]
    for r in res:
        assert r["cat"] == [0, 1, 2, 3, 4]
        assert r["concat"] == ["r0-0", "r0-1", "r0-2", "r1-3", "r1-4"]
        assert r["rows"].dtype == torch.float16 and torch.equal(r["rows"], torch.full((2, 2, 3), 7.0, dtype=torch.float16))
        assert r["none"].numel() == 0
        assert r["max"] == 1.0 and r["mean"] == 0.5
        assert r["padded"].tolist() == [[5, 5, 0], [5, 5, 5]]
        assert r["same"] == [0.0, 0.0, 1.0, 1.0] and r["padded_to"].tolist() == [[5, 5, 0, 0], [5, 5, 5, 0]]
    # uneven counts (3 and 2 rows): each rank's offset, and its rows' gradient summed over both ranks' losses
    assert [r["with_grad"][0] for r in res] == [0, 3]
    for r in res:
        assert r["with_grad"][1] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert r["with_grad"][2] == [2.0 * (r["with_grad"][0] + i + 1) for i in range(len(r["with_grad"][3]))]


def test_world_of_one_is_a_no_op():
    d = Dist()
    t = torch.arange(3.0)
    assert not d.enabled and d.is_main
    assert d.cat(t) is t and d.concat([1]) == [1] and list(d.shard(4)) == [0, 1, 2, 3]
    assert d.cat_with_grad(t) == (t, 0) and d.cat_padded(t) is t
    d.check_same("x", "anything")  # nothing to compare against


def test_mask_digest_tells_masks_apart():
    m = torch.zeros(10, dtype=torch.bool)
    m2 = m.clone()
    m2[3] = True
    assert mask_digest(m, 0.5) == mask_digest(m.clone(), 0.5)
    assert mask_digest(m, 0.5) != mask_digest(m2, 0.5)
    assert mask_digest(m, 0.5) != mask_digest(m, 0.25)


@pytest.mark.parametrize("world,drop_last", [(2, True), (2, False), (3, False)])
def test_sharded_batches_together_are_the_single_process_batch(world, drop_last):
    n, per_rank = 23, 3
    single = Batches(n, per_rank * world, lambda idx, rng: sorted(idx), seed=4, drop_last=drop_last)
    shards = [Batches(n, per_rank, lambda idx, rng: sorted(idx), seed=4, drop_last=drop_last).shard(r, world)
              for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for whole, *parts in zip(single, *shards):
        got = sorted(i for p in parts for i in p)
        if drop_last or len(got) == len(whole):
            assert got == whole
        else:  # the last, padded batch: every item of it is there, padding repeats the epoch's first items
            assert set(whole) <= set(got)


def test_batches_resume_from_a_position():
    draws = []

    def make(idx, rng):
        draws.append(tuple(idx))
        return (tuple(idx), rng.random())

    b = Batches(10, 3, make, seed=1)
    it = b.endless()
    first = [next(it) for _ in range(5)]  # crosses an epoch boundary (4 batches per pass)
    pos = dict(b.position)
    rest = [next(it) for _ in range(6)]
    draws.clear()
    b2 = Batches(10, 3, make, seed=1)
    it2 = b2.endless(pos)
    again = [next(it2) for _ in range(6)]
    assert again == rest  # same items and the same per-batch random draws
    assert len(draws) == 6  # the batches before the position were not made again
    assert first[0] != rest[0]


def test_checkpoint_state_survives_torch_load_weights_only(tmp_path):
    b = Batches(10, 3, lambda idx, rng: rng.random(), seed=1)
    it = b.endless()
    next(it)
    torch.save({"pos": b.position}, tmp_path / "s.pt")
    pos = torch.load(tmp_path / "s.pt", weights_only=True)["pos"]
    x = next(it)
    assert next(Batches(10, 3, lambda idx, rng: rng.random(), seed=1).endless(pos)) == x
    assert isinstance(random.Random().getstate(), tuple)


@pytest.mark.parametrize("limit", [1, 3], ids=["fewer-records-than-ranks", "uneven-shares"])
def test_distributed_retrieval_evaluation_equals_one_process(tmp_path, limit):
    from upop.datasets import shapes

    shapes(tmp_path / "d", train=4, val=2, test=3, image_size=32, classification_per_class=(1, 1, 1))
    one = _blip_eval(str(tmp_path), limit)
    two = _spawn(tmp_path, f"retrieval:{limit}")
    for r in two:
        assert r.keys() == one.keys()
        for k, v in one.items():
            assert r[k] == pytest.approx(v, abs=1e-4), k


@pytest.mark.parametrize("family,class_name", [("blip", "BlipForImageTextRetrieval"), ("clip", "CLIPModel"),
                                               ("siglip", "SiglipModel")])
def test_itc_over_gathered_features_equals_one_process(tmp_path, family, class_name):
    """Each rank's rows against every rank's columns: the ranks' mean loss and DDP-averaged gradients are the
    whole batch's in one process (logit_scale and logit_bias included)."""
    one = _itc_run(family, class_name, str(tmp_path), 0, 1)
    two = _spawn(tmp_path, f"itc:{family}:{class_name}")
    for r in two:
        assert r["loss"] == pytest.approx(one["loss"], abs=1e-5)
        for name, g in one["grads"].items():
            assert torch.allclose(r["grads"][name], g, atol=1e-5), name
    assert any(float(g.abs().sum()) > 0 for g in one["grads"].values())


def test_the_ddp_probe_leaves_the_rng_as_one_call_does(tmp_path):
    assert all(r["same_rng"] for r in _spawn(tmp_path, "probe"))


def test_hard_negatives_come_from_the_other_rank(tmp_path):
    res = _spawn(tmp_path, "negatives")
    for rank, r in enumerate(res):
        assert r["neg_img"] == [1 - rank] and r["neg_txt"] == [1 - rank]
        assert r["itm_neg_img"] and r["itm_neg_txt"]
        assert r["vision_grad"] > 0


def test_a_world_of_one_moves_rows_where_asked():
    """Alone, ``cat`` still moves the rows to ``device``: BLIP's re-ranking indexes a host matrix with them, and
    rows left on the GPU crashed a single-GPU evaluation (under torchrun they passed through a buffer and moved)."""
    rows = torch.arange(6).reshape(3, 2)
    assert Dist().cat(rows, "meta").device.type == "meta"
    assert Dist().cat(rows) is rows


@pytest.mark.parametrize("n,bs,world,drop_last", [(7, 2, 2, False), (16, 3, 3, True), (5, 4, 2, False),
                                                  (11, 2, 3, False)])
def test_every_rank_gets_as_many_rows_in_each_batch(n, bs, world, drop_last):
    """What lets a training step gather without asking the other ranks for their counts (``same_rows``)."""
    b = Batches(n, bs, lambda idx, rng: idx, seed=0, drop_last=drop_last)
    for epoch in range(2):
        sizes = []
        for r in range(world):
            shard = b.shard(r, world)
            shard.epoch = epoch
            sizes.append([len(x) for x in shard])
        assert all(s == sizes[0] for s in sizes) and sizes[0], sizes


def test_two_processes_train_blip_reading_the_device_at_most_once_per_logging_window(tmp_path):
    from upop.datasets import shapes

    data = shapes(tmp_path / "d", train=8, val=2, test=3, image_size=32, classification_per_class=(1, 1, 1))
    for r in run_ranks(blip_training_reads, tmp_path / "ranks", 2, str(data), 7, 3):
        assert r["steps"] == 7 and r["windows"] == 3
        assert len(r["after_first"]) <= r["windows"], r["after_first"]
        assert {"cat_with_grad", "cat_same", "cat_padded"} <= set(r["collectives"])
        assert {c.split(" at ")[1].split(":")[0] for c in r["library"]} <= {"transformers/masking_utils.py"}


@pytest.mark.parametrize("agent_store", [False, True])
def test_a_gpu_rank_names_its_gpu_to_the_nccl_group(monkeypatch, agent_store):
    """Under torchrun on GPUs each rank joins NCCL with its LOCAL_RANK's GPU as ``device_id`` (without it NCCL's
    barrier guesses the device and warns on every rank: seen on an H100); on the CPU, gloo with no device."""
    from upop.training import distributed

    seen: list[dict] = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.append(kw))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "TCPStore", lambda *a, **kw: object())
    monkeypatch.setattr(torch.distributed, "PrefixStore", lambda prefix, store: (prefix, store))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed, "current", lambda: Dist(rank=1, world=2, local_rank=1, grouped=True))
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if agent_store:
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    distributed.init("cuda")
    distributed.init("cpu")
    assert seen[0]["backend"] == "nccl" and seen[0]["device_id"] == torch.device("cuda", 1)
    assert seen[1]["backend"] == "gloo" and "device_id" not in seen[1]


def test_only_torchruns_own_variables_make_a_group_and_a_worker_alone_keeps_the_gpu_it_named(monkeypatch):
    """A run id inherited without the rendezvous (a subprocess, an exported shell variable) is no torchrun launch;
    a worker alone keeps ``cuda:1`` where several take their LOCAL_RANK's GPU."""
    from upop.training import distributed

    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert not distributed.launched_by_torchrun()
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.launched_by_torchrun() and not distributed.has_peers()
    assert distributed._gpu("cuda:1", 0) == 1 and distributed._gpu("cuda", 0) == 0
    assert distributed.device_for(Dist(world=1, grouped=True), torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.has_peers() and distributed._gpu("cuda:1", 0) == 0
    assert distributed.device_for(Dist(rank=1, world=2, local_rank=1), torch.device("cuda", 0)) == torch.device("cuda", 1)
