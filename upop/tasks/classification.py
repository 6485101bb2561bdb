"""Image classification (ViT, DeiT: cross-entropy, top-1/top-5) and zero-shot classification with a
dual encoder (CLIP, SigLIP: evaluation only, class names turned into prompts)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..datasets.readers import DataError, read_classification
from ..training.distributed import current
from .base import Batches, Images, Task, device_of, distill_kl, register_task, to_device
from .metrics import topk_accuracy


def split_dir(data_dir: Path, split: str) -> Path:
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    for cand in (data_dir / "classification" / split, data_dir / split):
        if cand.is_dir():
            return cand
    raise DataError(f"{data_dir} has no {split} split for classification (looked for classification/{split}/ "
                    f"and {split}/ with one folder per class)")


class _ClassData(Task):
    name = "classification"
    primary = "top1"

    def _items(self, split: str, limit: int | None, classes: list[str] | None):
        items, names = read_classification(split_dir(self.data_dir, split), classes)
        if limit:
            items = random.Random(0).sample(items, min(limit, len(items)))
        return items, names


    def image_paths(self, split: str) -> list[Path]:
        return [path for path, _label in self._items(split, None, None)[0]]


@register_task("classification")
class Classification(_ClassData):
    artifact_graphs = ("classifier",)

    def _classes(self, model: nn.Module | None) -> list[str] | None:
        model = model if model is not None else self.model
        if model is None:
            return None
        id2label = getattr(model.config, "id2label", None) or {}
        names = [id2label[i] for i in sorted(id2label)]
        present = [s for s in ("train", "val", "test") if self._has(s)]
        _items, found = read_classification(split_dir(self.data_dir, present[0] if present else "train"))
        if set(found) <= set(names):
            return names
        if len(found) != len(names):
            raise DataError(f"the model has {len(names)} classes, the data has {len(found)} "
                            f"({', '.join(found[:5])}...)")
        return found  # same count, generic label names (LABEL_0...): folder order defines the labels

    def _has(self, split: str) -> bool:
        try:
            split_dir(self.data_dir, split)
            return True
        except DataError:
            return False

    def train_batches(self) -> Batches:
        classes = self._classes(None)
        items, _ = self._items("train", None, classes)

        def make(idx, rng: random.Random):
            return {"pixel_values": Images(tuple(items[i][0] for i in idx)),
                    "labels": torch.tensor([items[i][1] for i in idx])}

        return Batches(len(items), self.batch_size, make, seed=self.seed, images=self.images)

    def forward(self, model: nn.Module, batch, guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return {"logits": model(pixel_values=self.on_device(batch, model)["pixel_values"]).logits}

    def loss_from(self, out: dict[str, torch.Tensor], batch) -> torch.Tensor:
        logits = out["logits"].float()
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    def distill_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float) -> torch.Tensor:
        return distill_kl(student["logits"], teacher["logits"], temperature)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        items, _ = self._items(split, limit, self._classes(model))
        was = model.training
        model.eval()
        logits, labels = [], []
        dev = device_of(model)
        dist = current()
        mine = dist.share(items)  # under torchrun each rank scores its share
        chunks = [mine[s : s + self.eval_batch_size] for s in range(0, len(mine), self.eval_batch_size)]
        for chunk, px in zip(chunks, self.images.stream([[p for p, _ in c] for c in chunks], dev)):
            logits.append(self.forwards.logits(model, pixel_values=px).float())
            labels += [y for _, y in chunk]
        model.train(was)
        local = torch.cat(logits) if logits else torch.empty(0)
        res = topk_accuracy(dist.cat(local, dev).cpu(), torch.tensor(dist.concat(labels)))
        res["primary"] = res[self.primary]
        return res


@register_task("zero-shot")
class ZeroShotClassification(_ClassData):
    """Class folder names become prompts (``prompt`` option, default "a {}"); evaluation only."""

    artifact_graphs = ("image_encoder", "text_encoder")

    trainable = False

    def train_batches(self) -> Batches:
        raise DataError("zero-shot classification is an evaluation; train a dual encoder with --task retrieval")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        items, names = self._items(split, limit, None)
        prompt = str(self.options.get("prompt", "a {}"))
        dev = device_of(model)
        was = model.training
        model.eval()
        tok = to_device(self.prep.text([prompt.format(n.replace("_", " ")) for n in names]), dev)
        txt = self.forwards.encode_text(model, **tok).float()
        logits = []
        dist = current()
        mine = dist.share(items)
        groups = [[p for p, _ in mine[s : s + self.eval_batch_size]] for s in range(0, len(mine), self.eval_batch_size)]
        for px in self.images.stream(groups, dev):
            _seq, img = self.forwards.encode_image(model, px)
            logits.append(img.float() @ txt.t())
        model.train(was)
        local = torch.cat(logits) if logits else torch.empty(0)
        res = topk_accuracy(dist.cat(local, dev).cpu(), torch.tensor([y for _, y in items]))
        res["primary"] = res[self.primary]
        return res
