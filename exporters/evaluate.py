"""The task metric of an exported artifact (``upop eval EXPORT_DIR``): the task's own evaluation, with every
forward run by the exported graphs (ONNX Runtime) or engines (TensorRT).

The task object is the one ``upop eval MODEL`` builds (same splits, records, metrics, ``k_test``, generation
length); only its ``forwards`` (``upop.tasks.base.Forwards``, the seam every evaluation calls) are replaced by
``ArtifactForwards``, which run the artifact's graphs: the encoders, BLIP's ITM, the classifier, NLVR's
reasoning graph, and greedy decoding over the decoder graphs (captioning with its KV cache, VQA).

Tolerance. An fp32 graph reproduces PyTorch's outputs to within ``FP32_TOL`` = 1e-4 (``upop export`` checks
every graph on random inputs and records the max abs error in ``export.json``). A metric counts ranks, argmaxes
or greedy tokens of those outputs, so it moves only where two scores lie within that error of each other (a near
tie flips). ``METRIC_TOL`` = 1e-4 points admits no flip (one record of a 5,000-record split is worth 0.02 points):
it absorbs float rounding only, and the tests hold every task's fp32 export to it (the demos, and tiny captioning
and VQA models unpruned and slim, their decoded text compared too). On a large split a near tie may exist; its
flip moves an accuracy or recall by one record's worth (100/n points) and is not an export error. FP16 and INT8
artifacts move scores by far more: their metric is reported, not held to this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from upop.errors import ConfigError, ExportFolderError, NoEvaluationDataError
from upop.tasks.base import Decoding, Forwards

from .beam import BeamSettings
from .record import Record, evaluation_record, read_record
from .runtime import GraphModel

__all__ = ["METRIC_TOL", "Artifact", "ArtifactForwards", "evaluate_artifact", "evaluate_export",
           "evaluation_record", "open_artifact"]

#: |metric of the fp32 artifact − metric of the PyTorch model| in points (see the module docstring)
METRIC_TOL = 1e-4


# ---- the artifact and its forwards ---------------------------------------------------------------

@dataclass
class Artifact:
    """An export opened in a runtime: its graphs, its evaluation record, and where its processor files are."""

    model: GraphModel
    record: Record
    folder: Path
    runtime: str
    max_batch: int | None = None  # TensorRT: the engines' profile

    @property
    def manifest(self) -> dict[str, Any]:
        return self.model.manifest

    def providers(self) -> list[str]:
        used = self.model.providers_used()
        return sorted({p for v in used.values() for p in v[:1]})


def open_artifact(export_dir: str | Path, runtime: str = "onnxruntime", device: str = "cpu") -> Artifact:
    """An export folder run by ``runtime`` (a registered backend): an ONNX export in ONNX Runtime, a TensorRT
    folder's engines in TensorRT, ...; the ONNX graphs of another runtime's folder (its ``onnx/``) also run in
    ONNX Runtime."""
    from . import backend

    chosen = backend(runtime)
    folder = Path(export_dir)
    if not folder.is_dir():
        raise ExportFolderError(f"{export_dir} is not a folder (an export folder written by upop export)")
    model, onnx_dir, max_batch = chosen.open_graphs(folder, device)
    return Artifact(model, read_record(model.manifest, onnx_dir / "export.json"), onnx_dir, runtime, max_batch)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class ArtifactForwards(Forwards):
    """A task's forwards run by an artifact's graphs (host tensors in and out)."""

    def __init__(self, model: GraphModel):
        self.model = model
        self.tokens = model.manifest.get("tokens", {})

    def _run(self, graph: str, **inputs: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(o)) for o in self.model.run(graph, **{k: _np(v) for k, v in inputs.items()})]

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        outs = self._run("image_encoder", pixel_values=pixel_values)
        return (outs[0], outs[1]) if len(outs) == 2 else (None, outs[0])  # BLIP: (sequence, features)

    def encode_text(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", input_ids=input_ids, attention_mask=attention_mask)[0]

    def itm_logits(self, model: nn.Module, image_seq: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("itm", image_embeds=image_seq, input_ids=input_ids, attention_mask=attention_mask)[0]

    def logits(self, model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
        graph = "classifier" if "classifier" in self.model.graph_names() else "reasoning"
        return self._run(graph, **inputs)[0]

    def _token(self, name: str) -> int:
        value = self.tokens.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ExportFolderError(f"export.json has no tokens.{name}, which decoding needs (damaged?)")
        return value

    def generate(self, model: nn.Module, decoding: Decoding, **inputs: torch.Tensor) -> torch.Tensor:
        """``generate()``'s tokens from the artifact's graphs: greedy or beam search, with the task's prompt."""
        if "embed_tokens" in self.model.graph_names():  # a decoder VLM: prefill and steps with its KV cache
            return self._generate_with_cache(decoding, **inputs)
        bos, eos = self._token("bos_token_id"), self._token("sep_token_id")  # BLIP decodes [DEC] ... [SEP]
        px = _np(inputs["pixel_values"])
        if "decoder_prefill" not in self.model.graph_names():  # VQA: question encoder, answer decoder
            if decoding.num_beams != 1 or decoding.max_new_tokens is None:
                raise ExportFolderError("this export answers questions greedily only (max_new_tokens, one beam)")
            ids = self.model.greedy_answer(px, _np(inputs["input_ids"]), _np(inputs["attention_mask"]), bos, eos,
                                           decoding.max_new_tokens)
            return torch.from_numpy(ids)
        prompt = None
        if "input_ids" in inputs:  # as BLIP's generate(): the start token first, the prompt's end token dropped
            prompt = _np(inputs["input_ids"])[:, :-1].copy()
            prompt[:, 0] = bos
        p = 1 if prompt is None else prompt.shape[1]
        pad = self._token("pad_token_id")
        if decoding.num_beams == 1:
            new = decoding.max_new_tokens if decoding.max_length is None else decoding.max_length - p
            ids = self.model.greedy_caption(px, bos, eos, int(new), pad=pad, prompt=prompt, min_length=decoding.min_length)
            return torch.from_numpy(ids)
        if decoding.max_length is None:
            raise ExportFolderError("beam search needs a max_length (tokens in all)")
        start = prompt if prompt is not None else np.full((px.shape[0], 1), bos, dtype=np.int64)
        settings = BeamSettings(decoding.num_beams, decoding.max_length, decoding.min_length, decoding.length_penalty,
                                decoding.early_stopping)
        return torch.from_numpy(self.model.beam_caption(px, start, eos, pad, settings))


    def _generate_with_cache(self, decoding: Decoding, **inputs: torch.Tensor) -> torch.Tensor:
        """Greedy decoding of a decoder VLM over its graphs (``exporters.generate``), from the task's left-padded
        chat prompts: [B, prompt + new] ids, as ``generate`` returns them."""
        from .generate import greedy_generate

        if decoding.num_beams != 1 or decoding.max_new_tokens is None:
            raise ExportFolderError("this export decodes greedily only (max_new_tokens, one beam)")
        ids = greedy_generate(self.model, _np(inputs["input_ids"]), _np(inputs["attention_mask"]),
                              eos=self._token("eos_token_id"), pad=self._token("pad_token_id"),
                              max_new_tokens=decoding.max_new_tokens, pixel_values=_np(inputs["pixel_values"]),
                              image_token_id=self._token("image_token_id"))
        return torch.from_numpy(ids)


class ArtifactModule(nn.Module):
    """What a task's ``evaluate`` is given for an artifact: no weights (the artifact's forwards ignore it), the
    labels that evaluation reads from a model's config, and an empty parameter that keeps the task's tensors
    (pixels, token ids, similarity matrices) on the host."""

    def __init__(self, labels: dict[str, Any], tokens: dict[str, Any] | None = None):
        super().__init__()
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        try:
            self.config = SimpleNamespace(id2label={int(k): v for k, v in labels.items()})
        except ValueError:
            raise ExportFolderError("export.json is damaged (a label key is not a class index)") from None
        self.config.text_config = export_text_config(tokens or {})


def export_text_config(tokens: dict[str, Any]) -> SimpleNamespace:
    """The text config's sizes and ids that ``export.json`` records (``tokens``): the text embedding's rows and the
    special ids, where BLIP's [ENC] is found (upop.models.enc_token)."""
    return SimpleNamespace(vocab_size=tokens.get("text_vocab_size"),
                           **{k: tokens.get(k) for k in ("bos_token_id", "sep_token_id", "eos_token_id", "pad_token_id")})


# ---- evaluation --------------------------------------------------------------------------------

def _task_key(artifact: Artifact, task: str) -> Any:
    """The adapter of the artifact's family, checked against the task and the graphs the export holds."""
    from upop.adapters import get_adapter
    from upop.tasks import trains
    from upop.tasks.base import family_tasks, implementation, task_class

    rec = artifact.record
    try:
        adapter = get_adapter(rec.family)
    except Exception:
        raise ExportFolderError(f"export.json names an unknown model family {rec.family!r} (damaged?)") from None
    key = implementation(adapter, task)
    if key is None:
        raise ConfigError(f"a {rec.family} export cannot do task {task!r}; it does: {', '.join(family_tasks(adapter))}")
    own = adapter.classes.get(rec.model_class)
    if not trains(adapter, task_class(key), rec.model_class):
        raise ExportFolderError(f"export.json says task {task!r}, but its model class {rec.model_class} does "
                                f"{own!r} (the file was edited?)")
    missing = [g for g in task_class(key).artifact_graphs if g not in artifact.model.graph_names()]
    if missing:
        raise ExportFolderError(f"task {task!r} needs graph(s) {', '.join(missing)}, which this export lacks "
                                f"(it has {', '.join(artifact.model.graph_names())})")
    return adapter


def evaluate_artifact(artifact: Artifact, *, data: str | Path | None = None, split: str = "test",
                      batch_size: int = 32, limit: int | None = None, task: str | None = None,
                      scoring: dict[str, Any] | None = None) -> dict[str, float]:
    """The metrics ``upop eval`` computes for the model, computed with the artifact's forwards; ``scoring``: task
    options over the recorded ones (``--k-test``, ``--rerank``, ``--max-new-tokens``)."""
    from upop.models.demo import shapes_dir
    from upop.tasks import Preprocessor, make_task

    for name, value in (("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, not {value!r}")
    rec = artifact.record
    name = task or rec.task
    adapter = _task_key(artifact, name)
    if data is None:
        if rec.demo is None:
            raise NoEvaluationDataError("no data given: pass the data folder to evaluate on (--data DIR); only exports of the "
                              "demo-* models have built-in data")
        data = shapes_dir()
    prep = Preprocessor.from_pretrained(artifact.folder, **rec.preprocessor)
    t = make_task(adapter, name, prep, data, **{**rec.task_options, **(scoring or {})})
    t.check_images()  # a corrupt image stops the evaluation now, naming the file
    # TensorRT: the engines take at most their profile's batch (the batching changes no metric)
    t.eval_batch_size = min(batch_size, artifact.max_batch or batch_size)
    t.forwards = ArtifactForwards(artifact.model)
    module = ArtifactModule(artifact.manifest.get("labels", {}), artifact.manifest.get("tokens", {}))
    t.model = module
    return t.evaluate(module, split, limit)


def evaluate_export(export_dir: str | Path, *, data: str | None = None, split: str = "test", batch_size: int = 32,
                    limit: int | None = None, runtime: str = "onnxruntime", device: str = "cpu") -> dict[str, float]:
    """The task metrics of the export in ``export_dir`` (the same keys as the PyTorch evaluation, "primary"
    included), every forward run by the artifact in ``runtime`` on ``device`` (ONNX Runtime: cpu, cuda or auto)."""
    artifact = open_artifact(export_dir, runtime, device)
    return evaluate_artifact(artifact, data=data, split=split, batch_size=batch_size, limit=limit)


def task_metric(data: str | None = None, limit: int | None = None, batch_size: int = 32) -> Callable[[Path, str], float]:
    """``upop export --precision``'s metric of a candidate folder: the primary metric of its evaluation."""

    def metric(export_dir: Path, split: str) -> float:
        return float(evaluate_export(export_dir, data=data, split=split, batch_size=batch_size, limit=limit)["primary"])

    return metric
