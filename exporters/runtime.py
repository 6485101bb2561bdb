"""Using the exported graphs: ONNX Runtime sessions for an export folder, and the task loops on top.

This is the code a deployment copies: classification, image/text embeddings, BLIP's ITM score,
greedy captioning over the decoder graph, and VQA answers. The ORT provider actually used is
reported, because the GPU build of onnxruntime falls back to the CPU silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from upop.run.safety import check_depth, member, read_json

from .beam import BeamSettings, beam_search
from .sessions import ort_session
from upop.errors import ExportFolderError  # noqa: F401  (defined with every error, raised and re-exported here)



def _session_errors() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for a damaged, truncated or missing graph file (its own exception types)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    names = ("InvalidProtobuf", "InvalidGraph", "Fail", "NoSuchFile", "InvalidArgument", "RuntimeException")
    return (OSError, RuntimeError, *(getattr(st, n) for n in names if hasattr(st, n)))


def read_export_manifest(export_dir: str | Path) -> dict[str, Any]:
    """``export.json``, checked: it is read from a folder that may come from anywhere."""
    folder = Path(export_dir)
    mpath = folder / "export.json"
    if not mpath.is_file():
        raise ExportFolderError(f"{export_dir} is not a upop export folder (no export.json)")
    try:
        manifest = check_depth(json.loads(mpath.read_text(encoding="utf-8")), mpath, ExportFolderError)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportFolderError(f"{mpath} is damaged (not valid JSON: {str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ExportFolderError(f"{mpath} is damaged (nested deeper than any export.json)") from None
    graphs = manifest.get("graphs") if isinstance(manifest, dict) else None
    if not isinstance(graphs, list) or not graphs or not isinstance(manifest.get("task"), str):
        raise ExportFolderError(f"{mpath} is damaged (no task or no list of graphs)")
    for g in graphs:
        if not isinstance(g, dict) or not isinstance(g.get("name"), str):
            raise ExportFolderError(f"{mpath} is damaged (a graph without a name)")
        member(folder, g.get("file"), f"graph {g['name']} file", ExportFolderError)
        for precision in ("fp16", "int8", "int8-dynamic", "int8-trt"):  # the graphs of other precisions beside FP32's
            if precision in g:
                extra = g[precision]
                member(folder, extra.get("file") if isinstance(extra, dict) else None,
                       f"graph {g['name']} {precision.upper()} file", ExportFolderError)
    for key in ("tokens", "labels"):
        if not isinstance(manifest.get(key, {}), dict):
            raise ExportFolderError(f"{mpath} is damaged ({key} must be an object)")
    return manifest


class GraphModel:
    """The task loops over an export's graphs, for any runtime that implements ``run``, ``input_names`` and
    ``output_names`` (ONNX Runtime: ``OrtModel``; TensorRT: ``TrtModel``). Arrays in and out (numpy)."""

    manifest: dict[str, Any]
    dir: Path

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs, in its output order, from the inputs it reads (others are ignored)."""
        raise NotImplementedError

    def input_names(self, graph: str) -> list[str]:
        raise NotImplementedError

    def output_names(self, graph: str) -> list[str]:
        raise NotImplementedError

    def feed(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs ``graph`` reads, by name; a graph that reads what this export's task does not give is
        not this export's (a folder put together from two exports)."""
        wanted = self.input_names(graph)
        if set(wanted) - set(inputs):
            raise ExportFolderError(f"{self.dir}: graph {graph} takes {', '.join(wanted)}, not what a "
                                    f"{self.manifest['task']} export gives it: the graph is not this export's")
        return {name: inputs[name] for name in wanted}

    def providers_used(self) -> dict[str, list[str]]:
        """Per graph, where it runs (first: the provider or runtime that runs it)."""
        raise NotImplementedError

    def graph_names(self) -> list[str]:
        return [g["name"] for g in self.manifest["graphs"]]

    def _check_graph(self, graph: str) -> None:
        if graph not in self.graph_names():
            raise ExportFolderError(f"this export has no graph {graph!r} (it has {', '.join(self.graph_names())})")

    # ---- task loops --------------------------------------------------------------------------
    def greedy_caption(self, pixel_values: np.ndarray, bos: int, eos: int, max_new_tokens: int = 30,
                       pad: int = 0, prompt: np.ndarray | None = None, min_length: int = 0) -> np.ndarray:
        """Greedy decoding with the KV cache: ``decoder_prefill`` once (on the start token, or on ``prompt``
        [B, P] whose first token is the start token), then ``decoder_step`` per token; the end token is
        forbidden below ``min_length`` tokens in all. The same tokens as ``generate()`` without sampling (tested)."""
        (emb,) = self.run("vision_encoder", pixel_values=pixel_values)
        batch = emb.shape[0]
        ids = np.full((batch, 1), bos, dtype=np.int64) if prompt is None else prompt.astype(np.int64)
        start = ids.shape[1]
        outs = self.run("decoder_prefill", image_embeds=emb, input_ids=ids, attention_mask=np.ones_like(ids))
        state = dict(zip(self.output_names("decoder_prefill"), outs))
        past = {n.replace("present_", "past_"): v for n, v in state.items() if n.startswith("present_")}
        past.update({f"past_{n}": v for n, v in state.items() if n.startswith("cross_")})
        logits = state["logits"]
        done = np.zeros(batch, dtype=bool)
        step_outputs = self.output_names("decoder_step")
        for _ in range(max_new_tokens):
            last = logits[:, -1].copy()
            if ids.shape[1] < min_length:
                last[:, eos] = -np.inf
            nxt = np.where(done, pad, last.argmax(-1))
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            done |= nxt == eos
            if done.all() or ids.shape[1] - start >= max_new_tokens:
                break
            res = dict(zip(step_outputs, self.run("decoder_step", image_embeds=emb,
                                                  input_ids=nxt[:, None].astype(np.int64),
                                                  attention_mask=np.ones_like(ids), **past)))
            logits = res["logits"]
            past.update({n.replace("present_", "past_"): v for n, v in res.items() if n.startswith("present_")})
        return ids

    def beam_caption(self, pixel_values: np.ndarray, prompt: np.ndarray, eos: int, pad: int,
                     settings: BeamSettings) -> np.ndarray:
        """Beam search with the KV cache (``exporters.beam``): ``decoder_prefill`` on the prompt ([B, P], its
        start token first), then ``decoder_step`` per token with the cache reordered to the surviving beams.
        The same tokens as ``generate(num_beams=K)`` (tested)."""
        (emb,) = self.run("vision_encoder", pixel_values=pixel_values)
        emb = np.repeat(emb, settings.num_beams, axis=0)
        past: dict[str, np.ndarray] = {}
        step_outputs = self.output_names("decoder_step")

        def prefill(ids: np.ndarray) -> np.ndarray:
            outs = self.run("decoder_prefill", image_embeds=emb, input_ids=ids, attention_mask=np.ones_like(ids))
            state = dict(zip(self.output_names("decoder_prefill"), outs))
            past.update({n.replace("present_", "past_"): v for n, v in state.items() if n.startswith("present_")})
            past.update({f"past_{n}": v for n, v in state.items() if n.startswith("cross_")})
            return state["logits"][:, -1]

        def step(tokens: np.ndarray, rows: np.ndarray, length: int) -> np.ndarray:
            for n in past:
                past[n] = past[n][rows]
            res = dict(zip(step_outputs, self.run("decoder_step", image_embeds=emb, input_ids=tokens[:, None],
                                                  attention_mask=np.ones((len(tokens), length), np.int64), **past)))
            past.update({n.replace("present_", "past_"): v for n, v in res.items() if n.startswith("present_")})
            return res["logits"][:, -1]

        return beam_search(prefill, step, prompt.astype(np.int64), eos, pad, settings)

    def greedy_answer(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, bos: int,
                      eos: int, max_new_tokens: int = 10) -> np.ndarray:
        (emb,) = self.run("vision_encoder", pixel_values=pixel_values)
        (q,) = self.run("question_encoder", image_embeds=emb, input_ids=input_ids, attention_mask=attention_mask)
        qmask = np.ones(q.shape[:2], dtype=np.int64)
        return self._greedy("answer_decoder", bos, eos, max_new_tokens, prefix="decoder_", question_embeds=q,
                            question_mask=qmask)

    def _greedy(self, graph: str, bos: int, eos: int, max_new_tokens: int, prefix: str = "",
                **context: np.ndarray) -> np.ndarray:
        """Greedy decoding without a cache (re-runs the whole answer each token; answers are short)."""
        batch = next(iter(context.values())).shape[0]
        ids = np.full((batch, 1), bos, dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        for _ in range(max_new_tokens):
            (logits,) = self.run(graph, **context, **{f"{prefix}input_ids": ids,
                                                       f"{prefix}attention_mask": np.ones_like(ids)})
            nxt = logits[:, -1].argmax(-1)
            # Finished rows keep emitting the pad token 0, as generate() pads them.
            nxt = np.where(done, 0, nxt)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            done |= nxt == eos
            if done.all():
                break
        return ids


class OrtModel(GraphModel):
    def __init__(self, export_dir: str | Path, fp16: bool = False, providers: list[str] | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        self.manifest = read_export_manifest(export_dir)
        if fp16 and not all("fp16" in g for g in self.manifest["graphs"]):
            raise ExportFolderError(f"{export_dir} has no FP16 graphs: export it with --fp16, or run without --fp16")
        avail = ort.get_available_providers()
        self.providers = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in avail]
        self.sessions: dict[str, Any] = {}
        for g in self.manifest["graphs"]:
            f = g["fp16"]["file"] if fp16 else g["file"]
            try:
                self.sessions[g["name"]] = ort_session(self.dir / f, self.providers)
            except _session_errors() as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ExportFolderError(f"{self.dir / f} cannot be loaded (damaged or not an ONNX graph): "
                                        f"{first[:200]}") from None

    def providers_used(self) -> dict[str, list[str]]:
        return {k: s.get_providers() for k, s in self.sessions.items()}

    def input_names(self, graph: str) -> list[str]:
        self._check_graph(graph)
        return [i.name for i in self.sessions[graph].get_inputs()]

    def output_names(self, graph: str) -> list[str]:
        self._check_graph(graph)
        return [o.name for o in self.sessions[graph].get_outputs()]

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        feed = self.feed(graph, inputs)
        try:
            return self.sessions[graph].run(None, feed)
        except _session_errors() as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportFolderError(f"{self.dir}: graph {graph} cannot run on these inputs (not this export's "
                                    f"graph?): {first[:200]}") from None


class TrtModel(GraphModel):
    """The engines of a ``upop export --format tensorrt`` folder (``engines.json``, the ONNX export in ``onnx/``),
    run with ``EngineRunner`` (TensorRT 10 and 11 API): numpy in, the outputs copied back to the host after
    each run (the task loops are written over host arrays)."""

    def __init__(self, engine_dir: str | Path):
        from .tensorrt import EngineRunner, require_tensorrt

        require_tensorrt()
        self.dir = Path(engine_dir)
        self.meta = read_engines_manifest(self.dir)
        self.manifest = read_export_manifest(self.dir / "onnx")
        self.runners = {e["name"]: EngineRunner(self._engine_bytes(e)) for e in self.meta["engines"]}
        missing = sorted(set(self.graph_names()) - set(self.runners))
        if missing:
            raise ExportFolderError(f"{self.dir / 'engines.json'} has no engine for graph(s) {', '.join(missing)}")

    def _engine_bytes(self, entry: dict[str, Any]) -> bytes:
        path = member(self.dir, entry.get("file"), f"engine {entry['name']} file", ExportFolderError)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ExportFolderError(f"{path} cannot be read ({exc.strerror or type(exc).__name__})") from None

    def providers_used(self) -> dict[str, list[str]]:
        return {k: ["TensorRT"] for k in self.runners}

    def input_names(self, graph: str) -> list[str]:
        self._check_graph(graph)
        return list(self.runners[graph].inputs)

    def output_names(self, graph: str) -> list[str]:
        """The ONNX graph's output order (an engine lists its tensors in an order of its own)."""
        self._check_graph(graph)
        spec = next(g for g in self.manifest["graphs"] if g["name"] == graph).get("outputs")
        names = [o.get("name") for o in spec] if isinstance(spec, list) and all(isinstance(o, dict) for o in spec) \
            else []
        return names if sorted(map(str, names)) == sorted(self.runners[graph].outputs) else list(self.runners[graph].outputs)

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        import torch

        runner = self.runners[graph]
        outs = runner.bind({name: torch.from_numpy(np.ascontiguousarray(inputs[name]))
                            for name in self.input_names(graph)})
        runner.run()
        # .cpu() waits on the current stream, the one the engine was enqueued on
        return [outs[name].float().cpu().numpy() if outs[name].is_floating_point() else outs[name].cpu().numpy()
                for name in self.output_names(graph)]


def read_engines_manifest(engine_dir: str | Path) -> dict[str, Any]:
    """``engines.json`` of a TensorRT export folder, checked like ``export.json``."""
    folder = Path(engine_dir)
    path = folder / "engines.json"
    if not path.is_file():
        raise ExportFolderError(f"{engine_dir} is not a upop TensorRT export folder (no engines.json)")
    meta = read_json(path, ExportFolderError)  # depth-limited: the folder may come from anywhere
    engines = meta.get("engines") if isinstance(meta, dict) else None
    if not isinstance(engines, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                for e in engines):
        raise ExportFolderError(f"{path} is damaged (no list of named engines)")
    return meta
