"""Visual reasoning over an image pair (NLVR2): is the sentence true of the two images?"""

from __future__ import annotations

import random

import torch
from torch import nn

from ..datasets.readers import read_nlvr
from .base import Batches, Images, Task, device_of, distill_kl, register_task, to_device


@register_task("blip-nlvr")
class BlipVisualReasoning(Task):
    name = "nlvr"
    primary = "acc"
    artifact_graphs = ("reasoning",)
    annotation = ("nlvr_{split}.json", "nlvr2_{split}.json", "nlvr_{split}.jsonl")
    images_per_record = 2
    reader = staticmethod(read_nlvr)

    def train_batches(self) -> Batches:
        recs = self._records("train")

        def make(idx, rng: random.Random):
            chunk = [recs[i] for i in idx]
            # [batch, 2, 3, H, W]: each record's two images
            batch = {"pixel_values": Images(tuple(img for r in chunk for img in r.images), per=2),
                     "labels": torch.tensor([r.label for r in chunk])}
            batch.update(self.prep.text([r.sentence for r in chunk]))
            return batch

        return Batches(len(recs), self.batch_size, make, seed=self.seed, images=self.images)

    def forward(self, model: nn.Module, batch, guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        inputs = self.on_device(batch, model)
        if guide is not None:  # a teacher: its own loss is not needed
            inputs.pop("labels", None)
        out = model(**inputs)
        return {"logits": out.logits} if out.loss is None else {"logits": out.logits, "loss": out.loss}

    def loss_from(self, out: dict[str, torch.Tensor], batch) -> torch.Tensor:
        return out["loss"]

    def distill_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float) -> torch.Tensor:
        return distill_kl(student["logits"], teacher["logits"], temperature)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        recs = self._records(split, limit)
        dev = device_of(model)

        def judge(chunk, px) -> list[int]:
            tok = to_device(self.prep.text([r.sentence for r in chunk]), dev)
            return self.forwards.logits(model, pixel_values=px.view(len(chunk), 2, *px.shape[1:]), **tok).argmax(-1).tolist()

        preds = self.predict_all(model, recs, judge, lambda r: r.images)
        correct = sum(int(p == r.label) for p, r in zip(preds, recs))
        acc = 100.0 * correct / len(recs)
        true_share = 100.0 * sum(r.label for r in recs) / len(recs)
        return {"acc": acc, "majority": max(true_share, 100.0 - true_share), "primary": acc}
