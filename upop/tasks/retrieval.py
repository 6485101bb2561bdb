"""Image↔text retrieval: BLIP (ITC + ITM, ITM re-ranking of the ITC top-k) and dual encoders
(CLIP's contrastive loss, SigLIP's sigmoid loss: each model's own)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..training.parts import amp_dtype, autocast
from ..datasets.loading import CaptionPairs
from ..datasets.readers import read_retrieval
from ..training.distributed import current
from ..errors import ConfigError
from ..training.momentum import QUEUE_INITS, Momentum
from ..run.options import SWITCH, Option, at_least, one_of
from ..models.enc_token import enc_token_id, text_embedding, with_enc
from .base import Batches, Images, Task, device_of, distill_kl, find_annotation, register_task, to_device
from .metrics import recall_at_k

#: ITM re-ranking depth by annotation file name (BLIP's retrieval configs), and for any other data
K_TEST_DEFAULTS = (("coco_karpathy_", 256), ("flickr30k_", 128))
K_TEST_FALLBACK = 256
#: BLIP's retrieval fine-tuning: the momentum model's EMA decay, the queue length (capped at the training set),
#: and the weight α of the momentum model's distribution in the ITC targets (raised from 0 over the first epoch)
MOMENTUM_DECAY, QUEUE_SIZE, ALPHA = 0.995, 57600, 0.4
#: BLIP's ITC temperature: its start and the range it is clamped to while it learns (models/blip_retrieval.py)
TEMPERATURE, TEMPERATURE_RANGE = 0.07, (0.001, 0.5)
#: the ITM re-ranking score: BLIP's raw positive-class logit (the default), or its softmax probability
RERANK_RULES = ("logit", "prob")
#: the options ``upop compress`` takes for BLIP retrieval (checked by their rules when the task is built)
K_TEST = Option("k_test", at_least(1), int, "Retrieval: ITM re-ranking depth at evaluation (default 256 for COCO, "
                                            "128 for Flickr30k, else 256).", task=True, scores=True)
MOMENTUM = Option("momentum", SWITCH, bool, "BLIP retrieval: distil from a momentum encoder and a queue of its "
                                            "features, as BLIP trains (default on).", switch=True, task=True)
RERANK = Option("rerank", one_of(*RERANK_RULES), help="BLIP retrieval: the ITM score added to the ITC similarity "
                                                      "when re-ranking: logit (default, BLIP's) | prob.", task=True,
                scores=True)


class _RetrievalData(Task):
    name = "retrieval"
    primary = "r_mean"
    annotation = ("retrieval_{split}.json", "coco_karpathy_{split}.json", "flickr30k_{split}.json", "{split}.json",
                  "retrieval_{split}.jsonl")
    reader = staticmethod(read_retrieval)

    def train_batches(self) -> Batches:
        """An epoch is every (image, caption) pair once, as the reference's (pairs / batch steps). Each item
        carries its image's index (``image_id``: another caption of the same image in the batch is a positive,
        never a negative) and its pair's (``pair_id``: what keys the batch's random draws)."""
        recs = self._records("train")
        pairs = CaptionPairs(len(r.captions) for r in recs)

        def make(idx, rng: random.Random):
            at = [pairs[k] for k in idx]
            batch: dict = {"pixel_values": Images(tuple(recs[r].image for r, _c in at))}
            batch.update(self.prep.text([recs[r].captions[c] for r, c in at]))
            batch["image_id"] = torch.tensor([r for r, _c in at], dtype=torch.long)
            batch["pair_id"] = torch.tensor(idx, dtype=torch.long)
            batch["batch_key"] = (tuple(idx), tuple(r for r, _c in at))  # the same ids, on the host
            return batch

        n = len(pairs)
        return Batches(n, self.batch_size, make, seed=self.seed, drop_last=n > self.batch_size, images=self.images)

    def k_test(self, split: str) -> int:
        """ITM re-ranking depth: the ``k_test`` option, else the reference's for the dataset the split's
        annotation file is named after (COCO 256, Flickr30k 128), else 256 (the caller caps it at the split)."""
        k = self.options.get("k_test")
        if k is None:
            name = find_annotation(self.data_dir, type(self), split).name
            return next((v for prefix, v in K_TEST_DEFAULTS if name.startswith(prefix)), K_TEST_FALLBACK)
        return k

    @torch.no_grad()
    def _embed(self, model: nn.Module, split: str, limit: int | None):
        """Records, texts, each text's image, and the embeddings: image features and text features of
        every record (gathered). No image sequence is kept: BLIP's ITM re-encodes them chunk by chunk
        (``_sequences``), so what evaluation holds does not grow with the split."""
        recs = self._records(split, limit)
        dev = device_of(model)
        texts, text_img = [], []
        for i, r in enumerate(recs):
            texts += r.captions
            text_img += [i] * len(r.captions)
        # Under torchrun each rank embeds its share; the features are gathered before ranking.
        dist = current()
        mine, my_texts = dist.shard(len(recs)), dist.shard(len(texts))
        img_feats, txt_feats = _Rows(len(mine)), _Rows(len(my_texts))
        bs = self.eval_batch_size
        for px in self.images.stream(self._groups(recs, mine), dev):
            _seq, feat = self.forwards.encode_image(model, px)
            img_feats.add(feat.float())
        for s in range(my_texts.start, my_texts.stop, bs):
            tok = to_device(self.prep.text(texts[s : min(s + bs, my_texts.stop)]), dev)
            txt_feats.add(self.forwards.encode_text(model, **tok).float())
        # Every rank joins every gather, also one whose share is empty (fewer records than ranks).
        img, txt = dist.cat(img_feats.rows(), dev), dist.cat(txt_feats.rows(), dev)
        return recs, texts, text_img, img, txt

    def _groups(self, recs: list[Any], mine: range) -> list[list[Any]]:
        """This rank's images in groups of ``eval_batch_size``."""
        bs = self.eval_batch_size
        return [[r.image for r in recs[s : min(s + bs, mine.stop)]] for s in range(mine.start, mine.stop, bs)]


class _Rows:
    """Batches of rows written into one tensor allocated at the first batch: no list of parts alive
    beside their concatenation."""

    def __init__(self, n: int):
        self.n, self.at = n, 0
        self.out: torch.Tensor | None = None

    def add(self, part: torch.Tensor) -> None:
        if self.out is None:
            self.out = part.new_empty((self.n, *part.shape[1:]))
        self.out[self.at : self.at + len(part)] = part
        self.at += len(part)

    def rows(self) -> torch.Tensor:
        """The rows, or an empty tensor (which ``Dist.cat`` takes from a rank with none)."""
        return self.out if self.out is not None else torch.empty(0)


def _cat_or_none(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts joined, or an empty tensor (which ``Dist.cat`` skips) when there are none."""
    return torch.cat(parts) if parts else torch.empty(0)


def _diag_targets(rows: int, offset: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Row i's positive among the gathered columns: the column at this rank's offset + i."""
    return torch.arange(rows, device=device) + offset.to(device)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (rows summing to 1)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(1).mean()


def _itc_terms(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Image → text and text → image similarity distributions, over the same gathered columns."""
    return (distill_kl(student["i2t"], teacher["i2t"], temperature)
            + distill_kl(student["t2i"], teacher["t2i"], temperature)) / 2


def _gathered_features(adapter, model: nn.Module, batch: dict[str, torch.Tensor]):
    """(image sequence, image features, text features, every rank's image and text features, this rank's
    offset in them); the gathered rows carry the gradient back to the rank that computed them."""
    seq, img = adapter.encode_image(model, batch["pixel_values"])
    txt = adapter.encode_text(model, batch["input_ids"], batch["attention_mask"])
    dist = current()
    # Every rank's training batch has as many rows (Batches.shard): no count is asked, the host goes on.
    img_all, offset = dist.cat_with_grad(img, same_rows=True)
    txt_all, _ = dist.cat_with_grad(txt, same_rows=True)
    return seq, img, txt, img_all, txt_all, torch.tensor(offset, device=img.device)


@register_task("dual-retrieval")
class DualEncoderRetrieval(_RetrievalData):
    """CLIP / SigLIP: the model's own loss (contrastive / sigmoid, with its learnable scale and bias) over the
    features of every rank's batch, cosine ranking."""

    artifact_graphs = ("image_encoder", "text_encoder")

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor],
                guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        batch = self.on_device(batch, model)
        _seq, img, txt, img_all, txt_all, offset = _gathered_features(self.adapter, model, batch)
        own = _diag_targets(len(img), offset, img.device)
        others = _same_image(batch, offset, len(img_all))
        others[torch.arange(len(img), device=img.device), own] = False
        return {"i2t": self.adapter.pair_logits(model, img, txt_all),
                "t2i": self.adapter.pair_logits(model, txt, img_all), "offset": offset, "others": others}

    def loss_from(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own loss, one positive per row; another caption of the row's image in the gathered batch
        is left out of it (a logit of −inf: no term in the softmax, none in the sigmoid loss) rather than counted
        as a negative. (The reference's CLIP counts it as a positive, which these losses cannot take.)"""
        others = out.get("others")
        i2t, t2i = out["i2t"], out["t2i"]
        if others is not None:
            i2t, t2i = i2t.masked_fill(others, float("-inf")), t2i.masked_fill(others, float("-inf"))
        return self.adapter.pair_loss(i2t, t2i, _diag_targets(len(i2t), out["offset"], i2t.device))

    def distill_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float) -> torch.Tensor:
        return _itc_terms(student, teacher, temperature)

    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        was = model.training
        model.eval()
        _recs, _texts, text_img, img, txt = self._embed(model, split, limit)
        model.train(was)
        sim = (img @ txt.t()).cpu()
        out = recall_at_k(sim, text_img)
        out["primary"] = out[self.primary]
        return out


@register_task("blip-retrieval")
class BlipRetrieval(_RetrievalData):
    """BLIP fine-tuning losses: ITC over every rank's features, at the learnable temperature BLIP trains (clamped to
    [0.001, 0.5]; ``learn_temperature=False``: fixed at ``temperature``), + ITM with hard negatives drawn from the ITC
    similarities over every rank's batch; evaluation ranks by ITC, then re-ranks each top-``k_test`` by ITM."""

    artifact_graphs = ("image_encoder", "text_encoder", "itm")

    title = "BLIP retrieval"
    task_options = (K_TEST, MOMENTUM, RERANK)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._momentum: Momentum | None = None
        self._steps = 0  # optimizer steps of this phase: with the batch, it keys the hard-negative draws
        if self.model is not None and self.learns_temperature():  # on the model before its optimizer is built
            self.adapter.itc_temperature(self.model, float(self.options.get("temperature", TEMPERATURE)))

    def learns_temperature(self) -> bool:
        on = self.options.get("learn_temperature", True)
        if not isinstance(on, bool):
            raise ConfigError(f"learn_temperature must be true or false, not {on!r}")
        return on

    def _temperature(self, model: nn.Module, clamp: bool) -> torch.Tensor | float:
        """The ITC temperature: the model's learnable one (clamped to BLIP's range before a training step, as the
        reference clamps it before each forward), else the fixed ``temperature`` option."""
        p = getattr(model, "itc_temp", None) if self.learns_temperature() else None
        if not isinstance(p, nn.Parameter):
            return float(self.options.get("temperature", TEMPERATURE))
        if clamp:
            with torch.no_grad():
                p.clamp_(*TEMPERATURE_RANGE)
        return p

    # -- the momentum model (BLIP's --momentum): hooks the training loop calls ---------------------------

    def momentum_on(self) -> bool:
        on = self.options.get("momentum")
        return True if on is None else on

    def train_begin(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        """A training phase starts (``state``: this task's part of an interrupted run's state)."""
        state = state or {}
        self._steps = int(state.get("steps", 0))
        if not self.momentum_on():
            self._momentum = None
            return
        if self._momentum is None:
            n = sum(len(r.captions) for r in self._records("train"))  # the epoch's (image, caption) pairs
            size = self.options.get("queue_size", QUEUE_SIZE)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"queue_size must be an integer >= 1, not {size!r}")
            # A queue longer than the training set would hold the same images' stale features many times over.
            per_epoch = max(1, -(-n // (self.batch_size * current().world)))
            masked, init = self.options.get("momentum_masked", False), self.options.get("queue_init", "random")
            if not isinstance(masked, bool):
                raise ConfigError(f"momentum_masked must be true or false, not {masked!r}")
            if init not in QUEUE_INITS:
                raise ConfigError(f"queue_init must be one of {', '.join(QUEUE_INITS)}, not {init!r}")
            self._momentum = Momentum(float(self.options.get("momentum_decay", MOMENTUM_DECAY)), min(size, max(1, n)),
                                      float(self.options.get("alpha", ALPHA)), per_epoch, masked=masked,
                                      queue_init=init, seed=self.seed)
        self._momentum.begin(model, state if "model" in state else None)

    def train_after_step(self, model: nn.Module) -> None:
        self._steps += 1
        if self._momentum is not None and self._momentum.ready():
            self._momentum.after_step(model)

    def train_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self._steps}
        if self._momentum is not None and self._momentum.ready():
            out.update(self._momentum.state())
        return out

    def _draws(self, key: tuple, device: torch.device) -> torch.Generator:
        """The generator of one batch's hard negatives, keyed by (seed, rank, step, the batch's pairs) and by no
        state that advances per call: DDP's first-batch probe runs a batch twice, and a resumed run starts the
        data loader (which draws from the global RNG) at another step; both still draw what an uninterrupted
        run draws."""
        seed = hash((self.seed, current().rank, self._steps, key)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor],
                guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        # The key travels on the host (``batch_key``): reading it back from the device would wait on the GPU.
        key = batch.get("batch_key") or tuple(tuple(batch[k].tolist()) for k in ("pair_id", "image_id") if k in batch)
        batch = self.on_device(batch, model)
        temp = self._temperature(model, clamp=guide is None)
        seq, img, txt, img_all, txt_all, offset = _gathered_features(self.adapter, model, batch)
        same = _same_image(batch, offset, len(img_all))
        out = {"i2t": img @ txt_all.t() / temp, "t2i": txt @ img_all.t() / temp, "offset": offset,
               "itc_targets": same.float() / same.sum(1, keepdim=True)}
        mom = self._momentum
        if guide is None and mom is not None and mom.ready() and "image_id" in batch:
            out.update(self._momentum_itc(mom, model, batch, img, txt, temp, key))
        if img_all.shape[0] < 2:
            return out
        if guide is not None:  # a teacher scores the student's pairs
            neg_img, neg_txt = guide["neg_img"], guide["neg_txt"]
        else:
            neg_img, neg_txt = _hard_negatives(out["t2i"], out["i2t"], same, self._draws(key, offset.device))
        dist = current()
        seq_all, _ = dist.cat_with_grad(seq, same_rows=True)
        # Gathered at the tokenizer's width, which every rank knows (asking for the widest would stall the host);
        # only the negative texts are scored at it, the rank's own at their own width.
        width = max(self.prep.max_length, batch["input_ids"].shape[1])
        ids_all, mask_all = (dist.cat_padded(batch[k], width=width, same_rows=True)
                             for k in ("input_ids", "attention_mask"))
        ids, mask = self._itm_ids(batch["input_ids"]), batch["attention_mask"]
        out["itm"] = torch.cat([self.adapter.itm_logits(model, torch.cat([seq, seq_all[neg_img]]),
                                                        torch.cat([ids, ids]), torch.cat([mask, mask])),
                                self.adapter.itm_logits(model, seq, self._itm_ids(ids_all[neg_txt]), mask_all[neg_txt])])
        out["neg_img"], out["neg_txt"] = neg_img, neg_txt
        return out

    def _momentum_itc(self, mom: Momentum, model: nn.Module, batch: dict[str, torch.Tensor], img: torch.Tensor,
                      txt: torch.Tensor, temp: torch.Tensor | float, key: tuple) -> dict[str, torch.Tensor]:
        """BLIP's ITC with momentum distillation: this rank's rows against the momentum features of every rank's
        batch and of the queue; targets α·(the momentum model's own distribution) + (1 − α)·(the positives:
        every column of the same image)."""
        dist = current()
        with torch.no_grad():
            m = mom.model_for(model)
            _seq, img_m = self.adapter.encode_image(m, batch["pixel_values"])
            txt_m = self.adapter.encode_text(m, batch["input_ids"], batch["attention_mask"])
            img_m_all, txt_m_all, ids_all = dist.cat_same(img_m), dist.cat_same(txt_m), dist.cat_same(batch["image_id"])
            q_img, q_txt, q_ids = mom.queue.rows(img_m_all)
            cols_img = torch.cat([img_m_all, q_img.to(img_m_all.dtype)])
            cols_txt = torch.cat([txt_m_all, q_txt.to(txt_m_all.dtype)])
            pos = (batch["image_id"][:, None] == torch.cat([ids_all, q_ids])[None, :]).float()
            pos = pos / pos.sum(1, keepdim=True)
            a = mom.alpha
            targets_i2t = a * F.softmax(img_m.float() @ cols_txt.float().t() / temp, dim=1) + (1 - a) * pos
            targets_t2i = a * F.softmax(txt_m.float() @ cols_img.float().t() / temp, dim=1) + (1 - a) * pos
            mom.stage(hash(key), img_m_all, txt_m_all, ids_all)
        return {"mom_i2t": img @ cols_txt.t() / temp, "mom_t2i": txt @ cols_img.t() / temp,
                "mom_i2t_targets": targets_i2t, "mom_t2i_targets": targets_t2i}

    def loss_from(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "mom_i2t" in out:
            itc = (_soft_ce(out["mom_i2t"], out["mom_i2t_targets"]) + _soft_ce(out["mom_t2i"], out["mom_t2i_targets"])) / 2
        else:  # every column of the row's image is a positive (BLIP's idx-based targets)
            itc = (_soft_ce(out["i2t"], out["itc_targets"]) + _soft_ce(out["t2i"], out["itc_targets"])) / 2
        if "itm" not in out:
            return itc
        b = len(out["i2t"])
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(out["itm"].device)
        return itc + F.cross_entropy(out["itm"], labels)

    def distill_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float) -> torch.Tensor:
        """ITC distributions both ways, plus the ITM distributions of the same (student-sampled) pairs."""
        terms = _itc_terms(student, teacher, temperature)
        if "itm" in student and "itm" in teacher:
            terms = terms + distill_kl(student["itm"], teacher["itm"], temperature)
        return terms

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        was = model.training
        model.eval()
        dev = device_of(model)
        dtype = amp_dtype(dev, self.amp)  # the compute dtype: image sequences are held in it, ITM runs in it
        with autocast(dev, dtype):
            recs, texts, text_img, img, txt = self._embed(model, split, limit)
        sim = img @ txt.t()
        del img, txt
        kt, ki = (min(self.k_test(split), n) for n in (sim.shape[1], sim.shape[0]))
        tok = to_device(self.prep.text(texts), dev)
        # Each rank re-ranks the pairs whose image it embedded: its images' top-k texts (image → text) and
        # the texts whose top-k holds one of its images (text → image), so it needs only its own sequences.
        mine = current().shard(sim.shape[0])
        i2t_pairs = _pairs(sim[mine.start : mine.stop].topk(kt, dim=1).indices, mine.start, rows_are_images=True)
        t2i_pairs = _pairs(sim.topk(ki, dim=0).indices.t(), 0, rows_are_images=False, keep=mine)
        with autocast(dev, dtype):
            chunks = self._sequences(model, recs, mine, dtype)
            i2t, t2i = self._rerank(model, sim, chunks, tok, [i2t_pairs, t2i_pairs])
        model.train(was)
        out = recall_at_k(i2t, text_img, sim_t2i=t2i.t())
        itc = recall_at_k(sim.cpu(), text_img)
        out["itc_r_mean"] = itc["r_mean"]
        out["k_test"] = float(max(kt, ki))  # the re-ranking depth used (capped at the split's size)
        out["primary"] = out[self.primary]
        return out

    def _sequences(self, model: nn.Module, recs: list[Any], mine: range,
                   dtype: torch.dtype | None) -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the first image, the image sequences) of this rank's images, one ``eval_batch_size`` chunk
        at a time, in ``dtype`` (else the model's): the ITM input, re-encoded rather than kept from the ITC
        pass, so at most one chunk is held whatever the split's size."""
        first = mine.start
        for px in self.images.stream(self._groups(recs, mine), device_of(model)):
            seq, _feat = self.forwards.encode_image(model, px)
            yield first, seq.to(dtype) if dtype is not None else seq
            first += len(seq)

    def _rerank(self, model, sim: torch.Tensor, chunks: Iterable[tuple[int, torch.Tensor]],
                tok: dict[str, torch.Tensor], pair_sets: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per set of ``pairs`` ([n, 2]: image, text), [images, texts] on the host: ITM + ITC for every rank's
        pairs, -1e4 elsewhere. The image sequences come chunk by chunk; each chunk scores its images' pairs."""
        sets = [_by_image(pairs) for pairs in pair_sets]
        scores: list[list[torch.Tensor]] = [[] for _ in sets]
        for first, seq in chunks:
            for (pairs, bounds), part in zip(sets, scores):
                # a chunk of images in no text's top-k has no text → image pair; splitting nothing still yields
                # one empty part, which the text encoder cannot take (a BLIP-base evaluation on a GPU crashed on it)
                for c in pairs[bounds(first, first + len(seq))].split(self.eval_batch_size):
                    if not len(c):
                        continue
                    img, txt = c[:, 0], c[:, 1]
                    itm = self._itm(model, seq[img - first], tok["input_ids"][txt], tok["attention_mask"][txt])
                    part.append(itm + sim[img, txt])
        return [_scatter(sim.shape, pairs, _cat_or_none(part)) for (pairs, _), part in zip(sets, scores)]

    def _itm(self, model, seq, ids, mask) -> torch.Tensor:
        """The re-ranking score added to the ITC similarity: the ITM head's positive-class logit (``rerank``
        "logit", BLIP's evaluation) or its softmax probability ("prob")."""
        logits = self.forwards.itm_logits(model, seq, self._itm_ids(ids), mask).float()
        return logits[:, 1] if self.rerank() == "logit" else F.softmax(logits, dim=1)[:, 1]

    def rerank(self) -> str:
        return self.options.get("rerank") or "logit"

    def _itm_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The ITM input: BLIP's ITM head was trained with [ENC] as the first text token (its ITC encoder reads
        [CLS]); where there is no [ENC], the ids as they are ([CLS]), said once."""
        if not hasattr(self, "_enc"):  # looked up once: the vocabulary is 30k entries
            self._enc = enc_token_id(self.prep.tokenizer, *text_embedding(self.model))
        return with_enc(ids, self._enc, "ITM")


def _same_image(batch: dict[str, torch.Tensor], offset: torch.Tensor, columns: int) -> torch.Tensor:
    """[local rows, every rank's columns] bool: the columns of the row's own image. With ``image_id`` (the
    training batches), every caption of the image in the gathered batch; without, the row's own column."""
    if "image_id" in batch:
        ids = batch["image_id"]
        return ids[:, None] == current().cat_same(ids)[None, :]  # training batches: equal rows on every rank
    rows = torch.arange(len(batch["input_ids"]), device=offset.device)
    return rows[:, None] + offset == torch.arange(columns, device=offset.device)[None, :]


def _hard_negatives(t2i: torch.Tensor, i2t: torch.Tensor, same: torch.Tensor,
                    gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local text a negative image, for each local image a negative text (indices into every rank's
    rows), drawn from the softmax of the similarities over all ranks' columns with every column of the row's
    own image (``same``) left out. A row whose gathered batch holds nothing but its own image (possible
    only when one image has more captions than the gathered batch) draws uniformly: it has no negative."""
    with torch.no_grad():
        w_t2i, w_i2t = _negative_weights(t2i, same), _negative_weights(i2t, same)
        return torch.multinomial(w_t2i, 1, generator=gen).squeeze(1), torch.multinomial(w_i2t, 1, generator=gen).squeeze(1)


#: where the re-ranked score matrices are assembled (the host: a test moves it to see every row follow)
HOST = torch.device("cpu")


def _scatter(shape: torch.Size, pairs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[images, texts] on ``HOST``: every rank's ``scores`` at its ``pairs``, -1e4 elsewhere."""
    dist = current()
    pairs_all, scores_all = dist.cat(pairs, HOST), dist.cat(scores, HOST)
    out = torch.full(shape, -1e4, device=HOST)
    if len(pairs_all):
        out[pairs_all[:, 0], pairs_all[:, 1]] = scores_all.float()
    return out


def _by_image(pairs: torch.Tensor) -> tuple[torch.Tensor, Callable[[int, int], slice]]:
    """``pairs`` in image order, and where the pairs of images ``[lo, hi)`` lie in them (two numbers read back
    per chunk: an evaluation may wait on the device)."""
    pairs = pairs[pairs[:, 0].argsort(stable=True)] if len(pairs) else pairs
    images = pairs[:, 0].contiguous()

    def bounds(lo: int, hi: int) -> slice:
        edges = torch.searchsorted(images, torch.tensor([lo, hi], device=images.device)).tolist()
        return slice(edges[0], edges[1])

    return pairs, bounds


def _negative_weights(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """BLIP's draw weights: softmax of the row's similarities, 0 on its own image's columns; a floor of 1e-9
    elsewhere keeps a row whose softmax underflows drawable."""
    pos = same.to(sim.device)
    floor = 1e-9 * (~pos | pos.all(1, keepdim=True))
    return F.softmax(sim.float(), dim=1).masked_fill(pos, 0) + floor


def _pairs(top: torch.Tensor, first: int, rows_are_images: bool, keep: range | None = None) -> torch.Tensor:
    """[n, 2] (image, text) pairs from ``top`` ([rows, k]: row ``first + r``'s k best columns); with ``keep``,
    only the pairs whose image is in it."""
    rows = torch.arange(first, first + top.shape[0], device=top.device).repeat_interleave(top.shape[1])
    cols = top.flatten()
    img, txt = (rows, cols) if rows_are_images else (cols, rows)
    pairs = torch.stack([img, txt], dim=1)
    if keep is not None:
        pairs = pairs[(img >= keep.start) & (img < keep.stop)]
    return pairs
