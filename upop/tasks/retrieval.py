"""Image↔text retrieval: BLIP (ITC + ITM, ITM re-ranking of the ITC top-k) and dual encoders
(CLIP's contrastive loss, SigLIP's sigmoid loss: each model's own)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..datasets.readers import read_retrieval
from ..distributed import current
from ..errors import ConfigError
from ..momentum import Momentum
from .base import Batches, Images, Task, device_of, distill_kl, find_annotation, register_task, to_device
from .metrics import recall_at_k

#: ITM re-ranking depth by annotation file name (BLIP's retrieval configs), and for any other data
K_TEST_DEFAULTS = (("coco_karpathy_", 256), ("flickr30k_", 128))
K_TEST_FALLBACK = 256
#: BLIP's retrieval fine-tuning: the momentum model's EMA decay, the queue length (capped at the training set),
#: and the weight α of the momentum model's distribution in the ITC targets (raised from 0 over the first epoch)
MOMENTUM_DECAY, QUEUE_SIZE, ALPHA = 0.995, 57600, 0.4


class _RetrievalData(Task):
    name = "retrieval"
    primary = "r_mean"
    annotation = "retrieval"
    reader = staticmethod(read_retrieval)

    def train_batches(self) -> Batches:
        recs = self._records("train")

        def make(idx, rng: random.Random):
            # One caption per image per batch: every image in a batch is a distinct positive.
            texts = [rng.choice(recs[i].captions) for i in idx]
            batch: dict = {"pixel_values": Images(tuple(recs[i].image for i in idx))}
            batch.update(self.prep.text(texts))
            return batch

        return Batches(len(recs), self.batch_size, make, seed=self.seed, drop_last=len(recs) > self.batch_size,
                       images=self.images)

    def k_test(self, split: str) -> int:
        """ITM re-ranking depth: the ``k_test`` option, else the reference's for the dataset the split's
        annotation file is named after (COCO 256, Flickr30k 128), else 256 (the caller caps it at the split)."""
        k = self.options.get("k_test")
        if k is None:
            name = find_annotation(self.data_dir, self.annotation, split).name
            return next((v for prefix, v in K_TEST_DEFAULTS if name.startswith(prefix)), K_TEST_FALLBACK)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k_test must be an integer >= 1, not {k!r}")
        return k

    @torch.no_grad()
    def _embed(self, model: nn.Module, split: str, limit: int | None):
        """Records, texts, each text's image, and the embeddings: image features and text features of
        every record (gathered), image sequences (BLIP's ITM input) of this rank's share only."""
        recs = self._records(split, limit)
        dev = device_of(model)
        texts, text_img = [], []
        for i, r in enumerate(recs):
            texts += r.captions
            text_img += [i] * len(r.captions)
        # Under torchrun each rank embeds its share; the features are gathered before ranking.
        dist = current()
        mine, my_texts = dist.shard(len(recs)), dist.shard(len(texts))
        img_feats, img_seqs, txt_feats = _Rows(len(mine)), _Rows(len(mine)), _Rows(len(my_texts))
        bs = self.eval_batch_size
        groups = [[r.image for r in recs[s : min(s + bs, mine.stop)]] for s in range(mine.start, mine.stop, bs)]
        for px in self.images.stream(groups, dev):
            seq, feat = self.forwards.encode_image(model, px)
            img_feats.add(feat.float())
            if seq is not None:
                img_seqs.add(seq)  # in the model's compute dtype, on its device
        for s in range(my_texts.start, my_texts.stop, bs):
            tok = to_device(self.prep.text(texts[s : min(s + bs, my_texts.stop)]), dev)
            txt_feats.add(self.forwards.encode_text(model, **tok).float())
        # Every rank joins every gather, also one whose share is empty (fewer records than ranks).
        img, txt = dist.cat(img_feats.rows(), dev), dist.cat(txt_feats.rows(), dev)
        return recs, texts, text_img, img, img_seqs.rows(), txt


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
    img_all, offset = dist.cat_with_grad(img)
    txt_all, _ = dist.cat_with_grad(txt)
    return seq, img, txt, img_all, txt_all, torch.tensor(offset, device=img.device)


@register_task("dual-retrieval")
class DualEncoderRetrieval(_RetrievalData):
    """CLIP / SigLIP: the model's own loss (contrastive / sigmoid, with its learnable scale and bias) over the
    features of every rank's batch, cosine ranking."""

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor],
                guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        batch = self.on_device(batch, model)
        _seq, img, txt, img_all, txt_all, offset = _gathered_features(self.adapter, model, batch)
        return {"i2t": self.adapter.pair_logits(model, img, txt_all),
                "t2i": self.adapter.pair_logits(model, txt, img_all), "offset": offset}

    def loss_from(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.adapter.pair_loss(out["i2t"], out["t2i"], _diag_targets(len(out["i2t"]), out["offset"],
                                                                             out["i2t"].device))

    def distill_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float) -> torch.Tensor:
        return _itc_terms(student, teacher, temperature)

    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        was = model.training
        model.eval()
        _recs, _texts, text_img, img, _seq, txt = self._embed(model, split, limit)
        model.train(was)
        sim = (img @ txt.t()).cpu()
        out = recall_at_k(sim, text_img)
        out["primary"] = out[self.primary]
        return out


@register_task("blip-retrieval")
class BlipRetrieval(_RetrievalData):
    """BLIP fine-tuning losses: ITC (temperature ``temperature``, fixed: the transformers BLIP retrieval model
    has no learnable temperature) over every rank's features + ITM with hard negatives drawn from the ITC
    similarities over every rank's batch; evaluation ranks by ITC, then re-ranks each top-``k_test`` by ITM."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._momentum: Momentum | None = None
        self._steps = 0  # optimizer steps of this phase: with the batch, it keys the hard-negative draws

    def train_batches(self) -> Batches:
        """The batches with each record's index (``image_id``): the momentum targets count a queued feature of
        the same image as a positive."""
        batches = super().train_batches()
        make = batches.make

        def with_ids(idx, rng):
            return {**make(idx, rng), "image_id": torch.tensor(idx, dtype=torch.long)}

        batches.make = with_ids
        return batches

    # -- the momentum model (BLIP's --momentum): hooks the training loop calls ---------------------------

    def momentum_on(self) -> bool:
        on = self.options.get("momentum")
        if on is not None and not isinstance(on, bool):
            raise ConfigError(f"momentum must be true or false, not {on!r}")
        return True if on is None else on

    def train_begin(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        """A training phase starts (``state``: this task's part of an interrupted run's state)."""
        state = state or {}
        self._steps = int(state.get("steps", 0))
        if not self.momentum_on():
            self._momentum = None
            return
        if self._momentum is None:
            n = len(self._records("train"))
            size = self.options.get("queue_size", QUEUE_SIZE)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"queue_size must be an integer >= 1, not {size!r}")
            # A queue longer than the training set would hold the same images' stale features many times over.
            per_epoch = max(1, -(-n // (self.batch_size * current().world)))
            self._momentum = Momentum(float(self.options.get("momentum_decay", MOMENTUM_DECAY)), min(size, max(1, n)),
                                      float(self.options.get("alpha", ALPHA)), per_epoch)
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

    def _draws(self, key: tuple[int, ...], device: torch.device) -> torch.Generator:
        """The generator of one batch's hard negatives, keyed by (seed, rank, step, the batch's images) and by no
        state that advances per call: DDP's first-batch probe runs a batch twice, and a resumed run starts the
        data loader (which draws from the global RNG) at another step; both still draw what an uninterrupted
        run draws."""
        seed = hash((self.seed, current().rank, self._steps, key)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor],
                guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        key = tuple(batch["image_id"].tolist()) if "image_id" in batch else ()
        batch = self.on_device(batch, model)
        temp = float(self.options.get("temperature", 0.07))
        seq, img, txt, img_all, txt_all, offset = _gathered_features(self.adapter, model, batch)
        out = {"i2t": img @ txt_all.t() / temp, "t2i": txt @ img_all.t() / temp, "offset": offset}
        mom = self._momentum
        if guide is None and mom is not None and mom.ready() and "image_id" in batch:
            out.update(self._momentum_itc(mom, model, batch, img, txt, temp, key))
        if img_all.shape[0] < 2:
            return out
        if guide is not None:  # a teacher scores the student's pairs
            neg_img, neg_txt = guide["neg_img"], guide["neg_txt"]
        else:
            neg_img, neg_txt = _hard_negatives(out["t2i"], out["i2t"], offset, self._draws(key, offset.device))
        dist = current()
        seq_all, _ = dist.cat_with_grad(seq)
        ids_all = dist.cat_padded(batch["input_ids"])
        mask_all = dist.cat_padded(batch["attention_mask"])
        width = ids_all.shape[1]
        ids, mask = (F.pad(batch[k], (0, width - batch[k].shape[1])) for k in ("input_ids", "attention_mask"))
        out["itm"] = self.adapter.itm_logits(model, torch.cat([seq, seq_all[neg_img], seq]),
                                             torch.cat([ids, ids, ids_all[neg_txt]]),
                                             torch.cat([mask, mask, mask_all[neg_txt]]))
        out["neg_img"], out["neg_txt"] = neg_img, neg_txt
        return out

    def _momentum_itc(self, mom: Momentum, model: nn.Module, batch: dict[str, torch.Tensor], img: torch.Tensor,
                      txt: torch.Tensor, temp: float, key: tuple) -> dict[str, torch.Tensor]:
        """BLIP's ITC with momentum distillation: this rank's rows against the momentum features of every rank's
        batch and of the queue; targets α·(the momentum model's own distribution) + (1 − α)·(the positives:
        every column of the same image)."""
        dist = current()
        with torch.no_grad():
            m = mom.model_for(model)
            _seq, img_m = self.adapter.encode_image(m, batch["pixel_values"])
            txt_m = self.adapter.encode_text(m, batch["input_ids"], batch["attention_mask"])
            img_m_all, txt_m_all, ids_all = dist.cat(img_m), dist.cat(txt_m), dist.cat(batch["image_id"])
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
        else:
            target = _diag_targets(len(out["i2t"]), out["offset"], out["i2t"].device)
            itc = (F.cross_entropy(out["i2t"], target) + F.cross_entropy(out["t2i"], target)) / 2
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
        _recs, texts, text_img, img, seq, txt = self._embed(model, split, limit)
        sim = img @ txt.t()
        del img, txt
        kt, ki = (min(self.k_test(split), n) for n in (sim.shape[1], sim.shape[0]))
        tok = to_device(self.prep.text(texts), device_of(model))
        # Each rank re-ranks the pairs whose image it embedded: its images' top-k texts (image → text) and
        # the texts whose top-k holds one of its images (text → image), so it reads only its own sequences.
        mine = current().shard(sim.shape[0])
        i2t_pairs = _pairs(sim[mine.start : mine.stop].topk(kt, dim=1).indices, mine.start, rows_are_images=True)
        t2i_pairs = _pairs(sim.topk(ki, dim=0).indices.t(), 0, rows_are_images=False, keep=mine)
        i2t = self._rerank(model, sim, seq, tok, i2t_pairs, mine.start)
        t2i = self._rerank(model, sim, seq, tok, t2i_pairs, mine.start).t()
        del seq
        model.train(was)
        out = recall_at_k(i2t, text_img, sim_t2i=t2i)
        itc = recall_at_k(sim.cpu(), text_img)
        out["itc_r_mean"] = itc["r_mean"]
        out["k_test"] = float(max(kt, ki))  # the re-ranking depth used (capped at the split's size)
        out["primary"] = out[self.primary]
        return out

    def _rerank(self, model, sim: torch.Tensor, seq: torch.Tensor, tok: dict[str, torch.Tensor],
                pairs: torch.Tensor, first: int) -> torch.Tensor:
        """[images, texts] on the host: ITM + ITC for every rank's ``pairs`` ([n, 2]: image, text), -1e4 elsewhere."""
        scores = []
        for c in pairs.split(self.eval_batch_size) if len(pairs) else ():
            img, txt = c[:, 0], c[:, 1]
            itm = self._itm(model, seq[img - first], tok["input_ids"][txt], tok["attention_mask"][txt])
            scores.append(itm + sim[img, txt])
        dist = current()
        pairs_all = dist.cat(pairs, "cpu")
        scores_all = dist.cat(_cat_or_none(scores), "cpu")
        out = torch.full(sim.shape, -1e4)
        if len(pairs_all):
            out[pairs_all[:, 0], pairs_all[:, 1]] = scores_all.float()
        return out

    def _itm(self, model, seq, ids, mask) -> torch.Tensor:
        return F.softmax(self.forwards.itm_logits(model, seq, ids, mask).float(), dim=1)[:, 1]


def _hard_negatives(t2i: torch.Tensor, i2t: torch.Tensor, offset: torch.Tensor,
                    gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local text a negative image, for each local image a negative text (indices into every rank's
    rows), drawn from the softmax of the similarities over all ranks' columns with the positive left out."""
    with torch.no_grad():
        rows = torch.arange(len(t2i), device=t2i.device)
        pos = torch.zeros(t2i.shape, dtype=torch.bool, device=t2i.device)
        pos[rows, rows + offset.to(t2i.device)] = True
        w_t2i = F.softmax(t2i.float(), dim=1).masked_fill(pos, 0) + 1e-9 * (~pos)
        w_i2t = F.softmax(i2t.float(), dim=1).masked_fill(pos, 0) + 1e-9 * (~pos)
        return torch.multinomial(w_t2i, 1, generator=gen).squeeze(1), torch.multinomial(w_i2t, 1, generator=gen).squeeze(1)


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
