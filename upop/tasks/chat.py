"""VQA and captioning for decoder VLMs (LLaVA-style, Idefics3/SmolVLM) as a causal LM under the model's own
chat template.

A training item is one user turn (the image and the question, or the caption instruction) and the assistant's
answer. The prompt is the processor's chat template up to its generation prompt, the image token expanded to
the image's tokens as the model's processor expands it; the answer is the rest of the template's rendering
of the whole exchange (the answer and its end-of-turn tokens). Only the answer is learnt: the prompt's and
the image's labels are -100. Training batches pad on the right; evaluation decodes greedily from the prompts
padded on the left (the new tokens then follow every prompt directly). One image per item at the processor's
own size: image splitting is turned off, so every prompt holds the same image tokens.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..datasets.readers import DataError, read_retrieval, read_vqa
from .base import MAX_NEW_TOKENS, Batches, Decoding, Images, Preprocessor, Task, device_of, distill_kl, register_task
from .metrics import bleu4, cider_d, vqa_accuracy

FAMILIES = ("llava", "idefics3")
MODEL_CLASSES = ("Idefics3ForConditionalGeneration", "LlavaForConditionalGeneration")
#: the user turn that asks for a caption
CAPTION_INSTRUCTION = "Describe the image."


class ChatEncoder:
    """Token ids of chat prompts and answers under a processor's chat template."""

    def __init__(self, processor: Any):
        self.processor, self.tokenizer = processor, processor.tokenizer
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("the model folder's processor has no chat template, which the chat tasks need")
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_ids = self._image_expansion()
        self.end_ids = self._end_ids()

    def _image_expansion(self) -> list[int]:
        """The ids the processor puts where the template says "image" (one image, no splitting), read once
        from the processor itself so they are what the model was trained with."""
        from PIL import Image

        probe = Image.new("RGB", (64, 64))
        enc = self.processor(text=[self.image_token], images=[probe], add_special_tokens=False)
        return [int(i) for i in enc["input_ids"][0]]

    def _end_ids(self) -> set[int]:
        """Tokens that end an answer: the tokenizer's end of sequence and the template's end of turn."""
        names = [self.tokenizer.eos_token, getattr(self.processor, "end_of_utterance_token", None)]
        return {int(self.tokenizer.convert_tokens_to_ids(n)) for n in names if n}

    @staticmethod
    def messages(prompt: str, answer: str | None = None) -> list[dict[str, Any]]:
        out = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if answer is not None:
            out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return out

    def _render(self, prompt: str, answer: str | None) -> str:
        return self.processor.apply_chat_template(self.messages(prompt, answer), tokenize=False,
                                                  add_generation_prompt=answer is None)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        """The user turn and the generation prompt, the image token expanded."""
        out: list[int] = []
        for i in self._ids(self._render(prompt, None)):
            out += self.image_ids if i == self.image_token_id else [i]
        return out

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """The tokens after the generation prompt in the whole exchange: the answer and its end of turn."""
        head, whole = self._render(prompt, None), self._render(prompt, answer)
        if not whole.startswith(head):
            raise DataError("the chat template renders the assistant's turn without its generation prompt first; "
                            "the answer tokens cannot be told from the prompt's")
        return self._ids(whole[len(head):])

    def decode(self, ids: Sequence[int]) -> str:
        """An answer's text: its tokens up to the first end token, special tokens dropped."""
        ids = list(ids)
        cut = next((k for k, i in enumerate(ids) if int(i) in self.end_ids), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()


def pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """[len(rows), longest] of ``rows`` padded with ``value`` on the right (on the left with ``left``)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for k, r in enumerate(rows):
        if r:
            out[k, slice(width - len(r), None) if left else slice(0, len(r))] = torch.tensor(r, dtype=torch.long)
    return out


def chat_inputs(encoder: ChatEncoder, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Training inputs: prompt + answer ids padded on the right; labels -100 on the prompt (image included)
    and on the padding, the answer's ids elsewhere."""
    rows, labels = [], []
    for p, a in zip(prompts, answers):
        head, tail = encoder.prompt_ids(p), encoder.answer_ids(p, a)
        rows.append(head + tail)
        labels.append([-100] * len(head) + tail)
    ids = pad(rows, encoder.tokenizer.pad_token_id)
    mask = pad([[1] * len(r) for r in rows], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": pad(labels, -100)}


def prompt_inputs(encoder: ChatEncoder, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Generation inputs: the prompts padded on the left, so every answer starts at the same column."""
    rows = [encoder.prompt_ids(p) for p in prompts]
    return {"input_ids": pad(rows, encoder.tokenizer.pad_token_id, left=True),
            "attention_mask": pad([[1] * len(r) for r in rows], 0, left=True)}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens only (position t predicts label t+1)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class ChatTask(Task):
    """What the chat VQA and caption tasks share: items (image, prompt, answer), the loss, distillation and
    greedy evaluation. Subclasses say how records become items and how predictions are scored."""

    task_options = (MAX_NEW_TOKENS,)
    title = "Chat VQA/caption"
    model_classes = MODEL_CLASSES
    artifact_graphs = ("vision_encoder", "embed_tokens", "decoder_prefill", "decoder_step")
    default_new_tokens: int = 8

    def __init__(self, adapter: Any, prep: Preprocessor, data_dir: Any, **kw: Any):
        super().__init__(adapter, prep, data_dir, **kw)
        processor = prep.multimodal()
        for images in {id(p): p for p in (processor.image_processor, prep.image_processor)}.values():
            if getattr(images, "do_image_splitting", False):
                images.do_image_splitting = False  # one image at the processor's size: a fixed image sequence
        self.encoder = ChatEncoder(processor)

    def items(self, split: str) -> list[tuple[Any, str, str]]:
        """(image path, prompt, answer) of every training example of ``split``."""
        raise NotImplementedError

    def train_batches(self) -> Batches:
        return item_batches(self.items("train"), self.batch_size, self.seed, self.images)

    def forward(self, model: nn.Module, batch, guide: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        dev = device_of(model)
        enc = chat_inputs(self.encoder, batch["prompts"], batch["answers"])
        labels = enc["labels"].to(dev)
        out = model(pixel_values=self.images.normalize(batch["pixel_values"], dev),
                    input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
        return {"logits": out.logits, "labels": labels, "keep": labels[:, 1:] != -100}

    def loss_from(self, out: dict[str, torch.Tensor], batch) -> torch.Tensor:
        return answer_loss(out["logits"], out["labels"])

    def distill_terms(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float) -> torch.Tensor:
        """Token KL under teacher forcing on the answer tokens (both models read the same inputs)."""
        return distill_kl(student["logits"][:, :-1], teacher["logits"][:, :-1], temperature, keep=student["keep"])

    def decoding(self) -> Decoding:
        return Decoding(max_new_tokens=int(self.options.get("max_new_tokens") or self.default_new_tokens))

    def generate(self, model: nn.Module, prompts: Sequence[str], px: torch.Tensor) -> list[str]:
        """Greedy answers to ``prompts`` about the images ``px`` (normalised, on the model's device)."""
        enc = prompt_inputs(self.encoder, prompts)
        dev = px.device
        out = self.forwards.generate(model, self.decoding(), pixel_values=px, input_ids=enc["input_ids"].to(dev),
                                     attention_mask=enc["attention_mask"].to(dev))
        return [self.encoder.decode(row) for row in out[:, enc["input_ids"].shape[1]:].tolist()]


def item_batches(items: list[tuple[Any, str, str]], batch_size: int, seed: int, images: Any) -> Batches:
    """Training batches over (image, prompt, answer) items: their images are decoded by the store's workers."""

    def make(idx, rng: random.Random):
        return {"pixel_values": Images(tuple(items[i][0] for i in idx)),
                "prompts": [items[i][1] for i in idx], "answers": [items[i][2] for i in idx]}

    return Batches(len(items), batch_size, make, seed=seed, images=images)


def mixed_batches(tasks: Sequence[ChatTask], batch_size: int, seed: int) -> Batches:
    """One training set of every task's items, shuffled together (demo-smolvlm learns VQA and captions at once)."""
    return item_batches([it for t in tasks for it in t.items("train")], batch_size, seed, tasks[0].images)


@register_task("chat-vqa", families=FAMILIES)
class ChatVQA(ChatTask):
    name = "vqa"
    primary = "vqa_acc"
    annotation = ("vqa_{split}.json", "vqa_{split}.jsonl")
    reader = staticmethod(read_vqa)

    def items(self, split: str) -> list[tuple[Any, str, str]]:
        # The most frequent annotator answer is the target, as BLIP's VQA trains.
        return [(r.image, r.question, Counter(r.answers).most_common(1)[0][0]) for r in self._records(split) if r.answers]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        recs = self._records(split, limit)
        preds = self.predict_all(model, recs, lambda chunk, px: self.generate(model, [r.question for r in chunk], px),
                                 lambda r: [r.image])
        acc = vqa_accuracy(preds, [r.answers for r in recs])
        return {"vqa_acc": acc, "primary": acc}


@register_task("chat-caption", families=FAMILIES)
class ChatCaption(ChatTask):
    name = "caption"
    primary = "cider"
    annotation = ("caption_{split}.json", "retrieval_{split}.json", "coco_karpathy_{split}.json",
                  "flickr30k_{split}.json", "{split}.json")
    reader = staticmethod(read_retrieval)
    default_new_tokens = 24

    def items(self, split: str) -> list[tuple[Any, str, str]]:
        return [(r.image, CAPTION_INSTRUCTION, c) for r in self._records(split) for c in r.captions]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict[str, float]:
        recs = self._records(split, limit)
        preds = self.predict_all(model, recs, lambda chunk, px: self.generate(model, [CAPTION_INSTRUCTION] * len(chunk), px),
                                 lambda r: [r.image])
        refs = [r.captions for r in recs]
        res = {"bleu4": bleu4(preds, refs), "cider": cider_d(preds, refs)}
        res["primary"] = res[self.primary]
        return res
