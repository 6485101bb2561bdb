"""Image↔text retrieval: BLIP (ITC + ITM, ITM re-ranking of the ITC top-k) and dual encoders
(CLIP's contrastive loss, SigLIP's sigmoid loss: each model's own)."""

from __future__ import annotations

import random

import torch
from torch import nn
from torch.nn import functional as F

from ..datasets.readers import read_retrieval
from ..distributed import current
from .base import Batches, Task, device_of, register_task, to_device
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
            batch = {"pixel_values": self.images.get([recs[i].image for i in idx])}
            batch.update(self.prep.text(texts))
            return batch

        return Batches(len(recs), self.batch_size, make, seed=self.seed, drop_last=len(recs) > self.batch_size)

    @torch.no_grad()
    def _embed(self, model: nn.Module, split: str, limit: int | None):
        recs = self._records(split, limit)
        dev = device_of(model)
        texts, text_img = [], []
        for i, r in enumerate(recs):
            texts += r.captions
            text_img += [i] * len(r.captions)
        img_feats, img_seqs, txt_feats = [], [], []
        # Under torchrun each rank embeds its share; the embeddings are gathered before ranking.
        dist = current()
        mine, my_texts = dist.shard(len(recs)), dist.shard(len(texts))
        for s in range(mine.start, mine.stop, self.eval_batch_size):
            px = self.images.get([r.image for r in recs[s : min(s + self.eval_batch_size, mine.stop)]]).to(dev)
            seq, feat = self.adapter.encode_image(model, px)
            img_feats.append(feat.float())
            if seq is not None:
                img_seqs.append(seq)
        for s in range(my_texts.start, my_texts.stop, self.eval_batch_size):
            tok = to_device(self.prep.text(texts[s : min(s + self.eval_batch_size, my_texts.stop)]), dev)
            txt_feats.append(self.adapter.encode_text(model, **tok).float())
        # Every rank joins every gather, also one whose share is empty (fewer records than ranks).
        seq = dist.cat(_cat_or_none(img_seqs))
        seqs = [seq] if seq.numel() else []
        return recs, texts, text_img, dist.cat(_cat_or_none(img_feats)), seqs, dist.cat(_cat_or_none(txt_feats))


def _cat_or_none(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts joined, or an empty tensor (which ``Dist.cat`` skips) when there are none."""
    return torch.cat(parts) if parts else torch.empty(0)


@register_task("dual-retrieval")
class DualEncoderRetrieval(_RetrievalData):
    """CLIP / SigLIP: the model's own loss (contrastive / sigmoid), cosine ranking."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.adapter.native_loss(model, to_device(batch, device_of(model)))

    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        was = model.training
        model.eval()
        _recs, _texts, text_img, img, _seqs, txt = self._embed(model, split, limit)
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
        batch = to_device(batch, device_of(model))
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
        recs, texts, text_img, img, seqs, txt = self._embed(model, split, limit)
        seq = torch.cat(seqs)
        sim = img @ txt.t()
        k = int(self.options.get("k_test", 16))
        dev = device_of(model)
        i2t = torch.full_like(sim, -1e4)
        t2i = torch.full_like(sim.t(), -1e4)
        tok = self.prep.text(texts)
        ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        kt, ki = min(k, sim.shape[1]), min(k, sim.shape[0])
        dist = current()  # each rank re-ranks its share of rows; the rest stay at -1e4 until the max-reduce
        for i in dist.shard(sim.shape[0]):
            top = sim[i].topk(kt).indices
            score = self._itm(model, seq[i].expand(kt, -1, -1), ids[top], mask[top])
            i2t[i, top] = score + sim[i, top]
        for j in dist.shard(sim.shape[1]):
            top = sim[:, j].topk(ki).indices
            score = self._itm(model, seq[top], ids[j].expand(ki, -1), mask[j].expand(ki, -1))
            t2i[j, top] = score + sim[top, j]
        i2t, t2i = dist.all_reduce_max(i2t), dist.all_reduce_max(t2i)
        model.train(was)
        out = recall_at_k(i2t.cpu(), text_img, sim_t2i=t2i.cpu())
        itc = recall_at_k(sim.cpu(), text_img)
        out["itc_r_mean"] = itc["r_mean"]
        out["primary"] = out[self.primary]
        return out

    def _itm(self, model, seq, ids, mask) -> torch.Tensor:
        return F.softmax(self.adapter.itm_logits(model, seq, ids, mask).float(), dim=1)[:, 1]
