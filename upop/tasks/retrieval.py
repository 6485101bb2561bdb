"""Image↔text retrieval: BLIP (ITC + ITM, ITM re-ranking of the ITC top-k) and dual encoders
(CLIP's contrastive loss, SigLIP's sigmoid loss: each model's own)."""

from __future__ import annotations

import random

import torch
from torch import nn
from torch.nn import functional as F

from ..datasets.readers import read_retrieval
from ..distributed import current
from .base import Batches, Images, Task, device_of, register_task, to_device
from .metrics import recall_at_k


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
            seq, feat = self.adapter.encode_image(model, px)
            img_feats.add(feat.float())
            if seq is not None:
                img_seqs.add(seq)  # in the model's compute dtype, on its device
        for s in range(my_texts.start, my_texts.stop, bs):
            tok = to_device(self.prep.text(texts[s : min(s + bs, my_texts.stop)]), dev)
            txt_feats.add(self.adapter.encode_text(model, **tok).float())
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


@register_task("dual-retrieval")
class DualEncoderRetrieval(_RetrievalData):
    """CLIP / SigLIP: the model's own loss (contrastive / sigmoid), cosine ranking."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.adapter.native_loss(model, self.on_device(batch, model))

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
    """BLIP fine-tuning losses: ITC (temperature ``temperature``) + ITM with hard negatives drawn
    from the ITC similarities; evaluation ranks by ITC, then re-ranks each top-``k`` by ITM."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = self.on_device(batch, model)
        temp = float(self.options.get("temperature", 0.07))
        seq, img_feat = self.adapter.encode_image(model, batch["pixel_values"])
        txt_feat = self.adapter.encode_text(model, batch["input_ids"], batch["attention_mask"])
        sim = img_feat @ txt_feat.t() / temp
        b = sim.shape[0]
        target = torch.arange(b, device=sim.device)
        itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
        if b < 2:
            return itc
        with torch.no_grad():
            eye = torch.eye(b, dtype=torch.bool, device=sim.device)
            w_t2i = F.softmax(sim.t().float(), dim=1).masked_fill(eye, 0) + 1e-9 * (~eye)
            w_i2t = F.softmax(sim.float(), dim=1).masked_fill(eye, 0) + 1e-9 * (~eye)
            neg_img = torch.multinomial(w_t2i, 1).squeeze(1)  # a hard negative image for each text
            neg_txt = torch.multinomial(w_i2t, 1).squeeze(1)  # a hard negative text for each image
        ids, mask = batch["input_ids"], batch["attention_mask"]
        img_all = torch.cat([seq, seq[neg_img], seq])
        ids_all = torch.cat([ids, ids, ids[neg_txt]])
        mask_all = torch.cat([mask, mask, mask[neg_txt]])
        logits = self.adapter.itm_logits(model, img_all, ids_all, mask_all)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return itc + F.cross_entropy(logits, labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        was = model.training
        model.eval()
        _recs, texts, text_img, img, seq, txt = self._embed(model, split, limit)
        sim = img @ txt.t()
        del img, txt
        k = int(self.options.get("k_test", 16))
        kt, ki = min(k, sim.shape[1]), min(k, sim.shape[0])
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
        return F.softmax(self.adapter.itm_logits(model, seq, ids, mask).float(), dim=1)[:, 1]


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
