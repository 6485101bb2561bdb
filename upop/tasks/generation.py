"""BLIP captioning (LM loss after the prompt "a picture of "; BLEU-4 and CIDEr-D on captions decoded as the
reference decodes them: that prompt, beam search of 3, 5 to 20 tokens) and VQA (generative answers; VQA
accuracy)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..datasets.loading import CaptionPairs
from ..datasets.readers import read_retrieval, read_vqa, read_vqa_training
from ..models.enc_token import enc_token_id, text_embedding, with_enc
from .base import MAX_NEW_TOKENS, Batches, Decoding, Images, Task, device_of, distill_kl, register_task, to_device
from .metrics import bleu4, cider_d, vqa_accuracy


def _decoder_ids(task: Task, model: nn.Module, texts: list[str], max_length: int | None = None, prompt: str = ""):
    """Decoder inputs and labels; with a ``prompt``, each text follows it and the prompt's tokens are not
    predicted (their labels are -100), as the reference trains its captioner."""
    tok = task.prep.text([prompt + t for t in texts], max_length=max_length)
    ids = tok["input_ids"].clone()
    ids[:, 0] = model.config.text_config.bos_token_id  # BLIP decodes from [DEC], not [CLS]
    labels = ids.masked_fill(tok["attention_mask"] == 0, -100)
    labels[:, : _prompt_length(task, prompt)] = -100
    return ids, tok["attention_mask"], labels


def _prompt_ids(task: Task, prompt: str) -> torch.Tensor:
    """[1, P + 1]: the start token, the prompt's tokens and the end token ``generate`` drops (unpadded)."""
    if task.prep.tokenizer is None:
        raise ValueError("the model folder has no tokenizer, which this task needs")
    return torch.tensor([task.prep.tokenizer(prompt)["input_ids"]], dtype=torch.long)


def _prompt_length(task: Task, prompt: str) -> int:
    """Decoder positions the prompt takes, its start token included (0 without a prompt)."""
    return _prompt_ids(task, prompt).shape[1] - 1 if prompt else 0


def _decoded(logits: torch.Tensor, loss: torch.Tensor | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoder's logits, the positions that predict a real token (the next label is not padding), and
    the model's own loss (the student's; a teacher runs without labels)."""
    out = {"logits": logits, "keep": labels[:, 1:] != -100}
    if loss is not None:
        out["loss"] = loss
    return out


def _decoder_loss(task: Task, out: dict[str, torch.Tensor], batch) -> torch.Tensor:
    return out["loss"]


def _token_kl(task: Task, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
              temperature: float) -> torch.Tensor:
    """Token-level KL under teacher forcing: position t predicts token t+1; padding is left out."""
    return distill_kl(student["logits"][:, :-1], teacher["logits"][:, :-1], temperature, keep=student["keep"])


@register_task("blip-caption")
class BlipCaption(Task):
    name = "caption"
    primary = "cider"
    artifact_graphs = ("vision_encoder", "decoder_prefill", "decoder_step")
    annotation = ("caption_{split}.json", "retrieval_{split}.json", "coco_karpathy_{split}.json",
                  "flickr30k_{split}.json", "{split}.json")
    reader = staticmethod(read_retrieval)

    def train_batches(self) -> Batches:
        """An epoch is every (image, caption) pair once, as the reference's (pairs / batch steps, the last
        partial batch dropped as its loader does)."""
        recs = self._records("train")
        pairs = CaptionPairs(len(r.captions) for r in recs)

        def make(idx, rng: random.Random):
            at = [pairs[k] for k in idx]
            return {"pixel_values": Images(tuple(recs[r].image for r, _c in at)),
                    "captions": [recs[r].captions[c] for r, c in at]}

        n = len(pairs)
        return Batches(n, self.batch_size, make, seed=self.seed, drop_last=n > self.batch_size, images=self.images)

    #: the reference's caption decoding (its prompt, beam search of 3, 5 to 20 tokens with the prompt)
    decoding = Decoding(max_length=20, min_length=5, num_beams=3, prompt="a picture of ")

    def forward(self, model: nn.Module, batch, guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        ids, mask, labels = _decoder_ids(self, model, batch["captions"], prompt=self.decoding.prompt)
        dev = device_of(model)
        out = model(pixel_values=self.images.normalize(batch["pixel_values"], dev), input_ids=ids.to(dev),
                    attention_mask=mask.to(dev), labels=None if guide is not None else labels.to(dev))
        return _decoded(out.logits, out.loss, labels.to(dev))

    loss_from = _decoder_loss
    distill_terms = _token_kl

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        recs = self._records(split, limit)
        d = self.decoding
        prompt = _prompt_ids(self, d.prompt) if d.prompt else None
        skip = _prompt_length(self, d.prompt)

        def caption(chunk, px) -> list[str]:
            extra = {}
            if prompt is not None:
                ids = prompt.repeat(px.shape[0], 1).to(px.device)  # generate() writes its start token into it
                extra = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            out = self.forwards.generate(model, d, pixel_values=px, **extra)
            return self.prep.decode(out[:, skip:])

        preds = self.predict_all(model, recs, caption, lambda r: [r.image])
        refs = [r.captions for r in recs]
        res = {"bleu4": bleu4(preds, refs), "cider": cider_d(preds, refs)}
        res["primary"] = res[self.primary]
        return res


@register_task("blip-vqa")
class BlipVQA(Task):
    name = "vqa"
    title = "BLIP VQA"
    primary = "vqa_acc"
    task_options = (MAX_NEW_TOKENS,)
    #: the answer's new tokens at evaluation (VQAv2 answers are a few words)
    default_new_tokens = 5
    artifact_graphs = ("vision_encoder", "question_encoder", "answer_decoder")
    annotation = ("vqa_{split}.json", "vqa_{split}.jsonl")
    reader = staticmethod(read_vqa)

    def train_batches(self) -> Batches:
        """Every question with an answer of every training file present: VQAv2 train and val and Visual Genome
        QA (``vqa_train``, ``vqa_val``, ``vg_qa``), as the reference trains."""
        recs = [r for r in read_vqa_training(self.data_dir, self.options.get("image_root")) if r.answers]

        def make(idx, rng: random.Random):
            return {"pixel_values": Images(tuple(recs[i].image for i in idx)),
                    "questions": [recs[i].question for i in idx],
                    # The most frequent annotator answer is the training target.
                    "answers": [Counter(recs[i].answers).most_common(1)[0][0] for i in idx]}

        return Batches(len(recs), self.batch_size, make, seed=self.seed, images=self.images)

    def forward(self, model: nn.Module, batch, guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        dev = device_of(model)
        q = self._questions(batch["questions"], dev)
        ids, mask, labels = _decoder_ids(self, model, batch["answers"], max_length=10)
        seen: list[torch.Tensor] = []
        # The model returns the answer decoder's loss only; its logits are read where the decoder returns them.
        hook = model.text_decoder.register_forward_hook(lambda _m, _a, out: seen.append(out.logits))
        try:
            out = model(pixel_values=self.images.normalize(batch["pixel_values"], dev), input_ids=q["input_ids"],
                        attention_mask=q["attention_mask"], decoder_input_ids=ids.to(dev),
                        decoder_attention_mask=mask.to(dev), labels=None if guide is not None else labels.to(dev))
        finally:
            hook.remove()
        return _decoded(seen[-1], out.loss, labels.to(dev))

    def _questions(self, questions: list[str], dev: torch.device) -> dict[str, torch.Tensor]:
        """The question encoder's input: BLIP trains and answers with [ENC] as its first token (it reads the
        image), where there is one."""
        if not hasattr(self, "_enc"):  # looked up once: the vocabulary is 30k entries
            self._enc = enc_token_id(self.prep.tokenizer, *text_embedding(self.model))
        q = self.prep.text(questions)
        q["input_ids"] = with_enc(q["input_ids"], self._enc, "question encoder")
        return to_device(q, dev)

    def image_paths(self, split: str) -> list[Path]:
        if split != "train":
            return super().image_paths(split)
        return [r.image for r in read_vqa_training(self.data_dir, self.options.get("image_root"))]

    loss_from = _decoder_loss
    distill_terms = _token_kl

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        recs = self._records(split, limit)
        dev = device_of(model)

        def answer(chunk, px) -> list[str]:
            q = self._questions([r.question for r in chunk], dev)
            new_tokens = int(self.options.get("max_new_tokens") or self.default_new_tokens)
            out = self.forwards.generate(model, Decoding(max_new_tokens=new_tokens),
                                         pixel_values=px, input_ids=q["input_ids"], attention_mask=q["attention_mask"])
            return self.prep.decode(out)

        preds = self.predict_all(model, recs, answer, lambda r: [r.image])
        res = {"vqa_acc": vqa_accuracy(preds, [r.answers for r in recs])}
        res["primary"] = res[self.primary]
        return res
