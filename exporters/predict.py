"""Inference on an export folder, per task: what ``upop predict`` shows, computed with the ONNX Runtime graphs.

One function per task reads the preprocessed inputs and returns the lines a person reads: the top classes,
a caption, an answer, image-text scores, or a true/false judgement of two images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from upop.errors import ConfigError

from .runtime import OrtModel


@dataclass
class Prediction:
    task: str
    lines: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@dataclass
class _Inputs:
    model: OrtModel
    prep: Any
    pixels: np.ndarray
    texts: list[str]

    def text(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.prep.text(texts).items()}

    def with_enc(self, ids: np.ndarray, reader: str) -> np.ndarray:
        """BLIP's [ENC] as the first token of a text an image-reading encoder takes (upop.models.enc_token)."""
        import torch

        from upop.models.enc_token import enc_token_id, text_ids, with_enc

        from .evaluate import export_text_config

        enc = enc_token_id(self.prep.tokenizer, *text_ids(export_text_config(self.tokens)))
        return with_enc(torch.from_numpy(ids), enc, reader).numpy()

    def decode(self, ids: np.ndarray) -> str:
        import torch

        return self.prep.decode(torch.from_numpy(ids))[0]

    @property
    def tokens(self) -> dict[str, int]:
        return _Tokens(self.model.manifest.get("tokens", {}), self.model.dir)


class _Tokens(dict):
    """``export.json``'s token ids; one it lacks (an edited task, another model's file) is one line."""

    def __init__(self, ids: dict[str, int], folder: Path):
        super().__init__(ids)
        self.folder = folder

    def __missing__(self, key: str) -> int:
        from upop.errors import ExportFolderError

        raise ExportFolderError(f"{self.folder}/export.json has no {key} under tokens: the task it names "
                                "does not match its graphs")


def _no_text(x: _Inputs, task: str) -> None:
    if x.texts:
        raise ConfigError(f"--text does not apply to a {task} model (it reads only the image): drop it")


def _classify(x: _Inputs) -> list[str]:
    _no_text(x, "classification")
    (logits,) = x.model.run("classifier", pixel_values=x.pixels)
    probs = _softmax(logits[0])
    labels = x.model.manifest.get("labels", {})
    return [f"{labels.get(str(i), str(i))}: {probs[i]:.3f}" for i in np.argsort(-probs)[:5]]


def _is_chat(x: _Inputs) -> bool:
    """A decoder VLM's export (vision, embeddings, prefill and step graphs) answers and captions under its chat
    template, as the chat tasks evaluate it."""
    return "embed_tokens" in {g["name"] for g in x.model.manifest["graphs"]}


def _chat(x: _Inputs, prompt: str) -> list[str]:
    from upop.tasks.chat import ChatEncoder, prompt_inputs

    from .generate import greedy_generate

    processor = x.prep.multimodal()
    processor.image_processor.do_image_splitting = False  # one image at the processor's size, as the tasks run it
    enc = prompt_inputs(ChatEncoder(processor), [prompt])
    ids = greedy_generate(x.model, enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
                          eos=x.tokens["eos_token_id"], pad=x.tokens["pad_token_id"], max_new_tokens=24,
                          pixel_values=x.pixels, image_token_id=x.tokens["image_token_id"])
    return [ChatEncoder(processor).decode(ids[0, enc["input_ids"].shape[1]:].tolist())]


def _caption(x: _Inputs) -> list[str]:
    """A caption decoded as the task's evaluation decodes it (BLIP: after its prompt, beam search of 3, 5 to 20
    tokens, the prompt left out of the line)."""
    import torch

    from .evaluate import ArtifactForwards

    _no_text(x, "captioning")
    if _is_chat(x):
        from upop.tasks.chat import CAPTION_INSTRUCTION

        return _chat(x, CAPTION_INSTRUCTION)
    cls = _task_class(x.model.manifest, "caption")
    if cls is None:
        from upop.errors import ExportFolderError

        raise ExportFolderError(f"{x.model.dir}/export.json says task caption, which a "
                                f"{x.model.manifest.get('family')} export does not do (the file was edited?)")
    decoding = cls.decoding
    extra, skip = {}, 0
    if decoding.prompt:
        ids = torch.tensor([x.prep.tokenizer(decoding.prompt)["input_ids"]], dtype=torch.long)
        extra, skip = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.shape[1] - 1
    out = ArtifactForwards(x.model).generate(None, decoding, pixel_values=torch.from_numpy(x.pixels), **extra)
    return [x.decode(out[0:1, skip:].numpy())]


def _reason(x: _Inputs) -> list[str]:
    if len(x.texts) != 1:
        raise ConfigError("a reasoning model judges one statement: --text 'both images contain a red circle'")
    (logits,) = x.model.run("reasoning", pixel_values=x.pixels[None], **x.text(x.texts))
    p = _softmax(logits[0])
    return [f"{'true' if p[1] > p[0] else 'false'} (p(true) = {p[1]:.3f})  {x.texts[0]}"]


def _answer(x: _Inputs) -> list[str]:
    if not x.texts:
        raise ConfigError("a VQA model needs a question: --text 'what color is the circle?'")
    if _is_chat(x):
        return _chat(x, x.texts[0])
    q = x.text(x.texts[:1])
    q["input_ids"] = x.with_enc(q["input_ids"], "question encoder")
    cls = _task_class(x.model.manifest, "vqa")
    ids = x.model.greedy_answer(x.pixels, q["input_ids"], q["attention_mask"], x.tokens["bos_token_id"],
                                x.tokens["sep_token_id"], getattr(cls, "default_new_tokens", 5))  # as upop eval
    return [x.decode(ids)]


def _score(x: _Inputs) -> list[str]:
    """ITC similarity and ITM match probability (BLIP), or the embeddings' cosine (CLIP, SigLIP)."""
    if not x.texts:
        raise ConfigError("image-text scoring needs at least one --text")
    t, m = x.text(x.texts), x.model
    if "itm" in {g["name"] for g in m.manifest["graphs"]}:
        emb, feat = m.run("image_encoder", pixel_values=x.pixels)
        (tf,) = m.run("text_encoder", **t)
        itc = (feat @ tf.T)[0]
        itm_text = t | {"input_ids": x.with_enc(t["input_ids"], "ITM")}  # ITC reads [CLS], ITM [ENC]
        (itm,) = m.run("itm", image_embeds=np.repeat(emb, len(x.texts), 0), **itm_text)
        p = _softmax(itm, 1)[:, 1]
        return [f"ITC {itc[i]:.3f}  ITM {p[i]:.3f}  {txt}" for i, txt in enumerate(x.texts)]
    (img,) = m.run("image_encoder", pixel_values=x.pixels)
    (tf,) = m.run("text_encoder", **t)
    sim = (img @ tf.T)[0]
    return [f"cosine {sim[i]:.3f}  {txt}" for i, txt in enumerate(x.texts)]


#: task name -> what ``upop predict`` shows for it (a task without one: image-text scores)
PRESENTERS: dict[str, Callable[[Any], list[str]]] = {
    "classification": _classify, "caption": _caption, "nlvr": _reason, "vqa": _answer}


def presenter(task: str):
    """Registers what ``upop predict`` shows for ``task``: ``fn(inputs)`` gets the export's graphs
    (``inputs.model.run(graph, **feeds)``), the image pixels (``inputs.pixels``), the texts and the processor, and
    returns the lines a person reads."""
    def deco(fn: Callable[[Any], list[str]]) -> Callable[[Any], list[str]]:
        PRESENTERS[task] = fn
        return fn

    return deco


def _task_class(manifest: dict[str, Any], task: str) -> Any:
    """The class of the task as the export's family does it (None where the export names no known family or the
    family cannot do the task, which the presenter then says)."""
    from upop.adapters import get_adapter
    from upop.errors import UpopError
    from upop.tasks.base import implementation, task_class

    try:
        key = implementation(get_adapter(str(manifest.get("family", ""))), task)
    except UpopError:
        return None
    return task_class(key) if key is not None else None


def _images_per_record(manifest: dict[str, Any], task: str) -> int:
    """How many images one record of the task holds (the task's declaration; 1 where it is unknown)."""
    cls = _task_class(manifest, task)
    return cls.images_per_record if cls is not None else 1


def predict(export_dir: str | Path, images: list[str | Path], texts: list[str], fp16: bool = False,
            task: str | None = None) -> Prediction:
    """Runs the export's graphs on ``images`` (two for a reasoning model) and ``texts``, shown as ``task`` (default:
    the task its model class does)."""
    from upop.datasets.readers import open_image
    from upop.tasks import Preprocessor

    model = OrtModel(export_dir, fp16=fp16)
    task = task or model.manifest["task"]
    wanted = _images_per_record(model.manifest, task)
    if len(images) != wanted:
        raise ConfigError(f"a {task} model takes {wanted} --image, not {len(images)}")
    prep = Preprocessor.from_pretrained(export_dir)
    pixels = prep.pixels([open_image(Path(i)) for i in images]).numpy()
    lines = PRESENTERS.get(task, _score)(_Inputs(model, prep, pixels, list(texts)))
    providers = sorted({p for v in model.providers_used().values() for p in v[:1]})
    return Prediction(task, lines, providers)
