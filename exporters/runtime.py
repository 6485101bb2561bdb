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

from upop.safety import check_depth, member

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


class OrtModel:
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

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        if graph not in self.sessions:
            raise ExportFolderError(f"this export has no graph {graph!r} (it has {', '.join(self.sessions)})")
        sess = self.sessions[graph]
        wanted = [i.name for i in sess.get_inputs()]
        if set(wanted) - set(inputs):
            raise ExportFolderError(f"{self.dir}: graph {graph} takes {', '.join(wanted)}, not what a "
                                    f"{self.manifest['task']} export gives it: the graph is not this export's")
        try:
            return sess.run(None, {name: inputs[name] for name in wanted})
        except _session_errors() as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportFolderError(f"{self.dir}: graph {graph} cannot run on these inputs (not this export's "
                                    f"graph?): {first[:200]}") from None

    # ---- task loops --------------------------------------------------------------------------
    def greedy_caption(self, pixel_values: np.ndarray, bos: int, eos: int, max_new_tokens: int = 30,
                       pad: int = 0) -> np.ndarray:
        """Greedy decoding with the KV cache: ``decoder_prefill`` once, then ``decoder_step`` per token.
        The same tokens as ``generate()`` without sampling (tested)."""
        (emb,) = self.run("vision_encoder", pixel_values=pixel_values)
        batch = emb.shape[0]
        ids = np.full((batch, 1), bos, dtype=np.int64)
        prefill = self.sessions["decoder_prefill"]
        outs = prefill.run(None, {k: v for k, v in {"image_embeds": emb, "input_ids": ids,
                                                     "attention_mask": np.ones_like(ids)}.items()
                                  if k in {i.name for i in prefill.get_inputs()}})
        names = [o.name for o in prefill.get_outputs()]
        state = dict(zip(names, outs))
        past = {n.replace("present_", "past_"): v for n, v in state.items() if n.startswith("present_")}
        past.update({f"past_{n}": v for n, v in state.items() if n.startswith("cross_")})
        logits = state["logits"]
        done = np.zeros(batch, dtype=bool)
        step = self.sessions["decoder_step"]
        step_outputs = [o.name for o in step.get_outputs()]
        for _ in range(max_new_tokens):
            nxt = np.where(done, pad, logits[:, -1].argmax(-1))
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            done |= nxt == eos
            if done.all() or ids.shape[1] > max_new_tokens:
                break
            feed = {"image_embeds": emb, "input_ids": nxt[:, None].astype(np.int64),
                    "attention_mask": np.ones_like(ids), **past}
            res = dict(zip(step_outputs, step.run(None, {i.name: feed[i.name] for i in step.get_inputs()})))
            logits = res["logits"]
            past.update({n.replace("present_", "past_"): v for n, v in res.items() if n.startswith("present_")})
        return ids

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
