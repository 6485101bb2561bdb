"""INT8 graphs from the exported FP32 ONNX graphs, with ONNX Runtime's quantization tools.

- ``int8``: static QDQ (``quantize_static``, QDQ format, per-channel symmetric INT8 weights), its
  activation ranges calibrated on real images of the task's train split through the model's processor.
- ``int8-dynamic``: ``quantize_dynamic``, INT8 MatMul weights, activations quantized at run time (no calibration).

Kept in float by default, because they are where INT8 costs accuracy: LayerNorm and Softmax (only MatMul
and Gemm are quantized), the patch embedding (a Conv) and the heads (the last MatMul/Gemm before a graph
output, found on the graph). ``sensitive_nodes`` ranks the quantized nodes by the noise quantization adds
at their inputs, so the precision step can return the worst ones to float.

Calibration feeds follow the graphs' data flow: pixels and tokens come from the data; an input another
graph computes (BLIP's ``image_embeds``, a decoder's past) comes from running that graph's FP32 file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from upop.errors import ConfigError, ExportError, UpopError

from .sessions import ort_session

__all__ = ["CALIBRATION_METHODS", "Calibration", "CalibrationData", "default_exclusions", "quantize_dynamic_graph",
           "quantize_static_graph", "sensitive_nodes"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ["MatMul", "Gemm"]
#: Images per calibration batch: bounds the memory calibration holds, whatever the calibration size.
CALIB_BATCH = 8


@dataclass(frozen=True)
class Calibration:
    """What the static INT8 graphs are calibrated on: ``size`` items of ``split``, drawn with ``seed``."""

    size: int = 128
    method: str = "minmax"
    seed: int = 0
    split: str = "train"

    def check(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"--calibration-size must be an integer >= 1, got {self.size!r}")
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--calibration-seed must be an integer >= 0, got {self.seed!r}")


# ---- the calibration items -------------------------------------------------------------------------
Item = tuple[tuple[Path, ...], "str | None"]


def _task_items(task: Any, split: str) -> list[Item]:
    """(images, text) per record of ``split``, read with the task's own reader (its data-folder rules)."""
    if hasattr(type(task), "reader"):
        out: list[Item] = []
        for r in task._records(split):
            images = tuple(r.images) if hasattr(r, "images") else (r.image,)
            text = (r.captions[0] if getattr(r, "captions", None) else
                    getattr(r, "question", None) or getattr(r, "sentence", None))
            out.append((images, text))
        return out
    return [((p,), None) for p in task.image_paths(split)]


class CalibrationData:
    """The seeded draw of calibration items from a task, and the feeds of each graph built from them."""

    def __init__(self, task: Any, spec: Calibration):
        spec.check()
        self.task, self.spec = task, spec
        items = _task_items(task, spec.split)
        if not items:
            raise ConfigError(f"the {spec.split} split has no items to calibrate on")
        self.items = random.Random(spec.seed).sample(items, min(spec.size, len(items)))

    def record(self) -> dict[str, Any]:
        """Split, count, seed, method and a hash of the item list: enough to know two calibrations used the same set."""
        root = Path(self.task.data_dir)
        lines = []
        for images, text in self.items:
            names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in images]
            lines.append("\t".join([*names, text or ""]))
        digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
        return {"split": self.spec.split, "count": len(self.items), "seed": self.spec.seed,
                "method": self.spec.method, "items_sha256": digest}

    def data_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The data's own inputs (pixels, tokens), one calibration batch at a time."""
        prep = self.task.prep
        for s in range(0, len(self.items), CALIB_BATCH):
            chunk = self.items[s : s + CALIB_BATCH]
            px = self.task.images.get([p for images, _ in chunk for p in images])
            per = len(chunk[0][0])
            if per > 1:  # an image pair per item (NLVR)
                px = px.reshape(len(chunk), per, *px.shape[1:])
            pool = {"pixel_values": px.float().numpy()}
            if all(t is not None for _, t in chunk):
                enc = prep.text([t for _, t in chunk])
                pool.update({k: v.numpy().astype(np.int64) for k, v in enc.items()})
            yield pool

    def feeds(self, files: Sequence[tuple[str, Path]], graph: str) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``graph`` (a name in ``files``, the FP32 graphs in export order): the graphs before it run on
        each data batch, so an input one of them computes is what it computes on real data."""
        names = [n for n, _ in files]
        upstream = [(n, ort_session(p)) for n, p in files[: names.index(graph)]]
        target = ort_session(dict(files)[graph])
        for pool in self.data_batches():
            for _name, sess in upstream:
                feed = _resolve(sess, pool)
                pool.update(_renamed(o.name, v) for o, v in zip(sess.get_outputs(), sess.run(None, feed)))
            yield _resolve(target, pool)


def _renamed(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A graph output under the name a later graph reads it by (a decoder's present cache is the next step's past)."""
    if name.startswith("present_"):
        return "past_" + name[len("present_"):], value
    if name.startswith("cross_"):
        return "past_" + name, value
    return name, value


def _resolve(sess: Any, pool: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The session's inputs from the pool, by name (the rules of the graphs in ``graphs.py``)."""
    wanted = {i.name: i for i in sess.get_inputs()}
    stepping = any(n.startswith("past_self_") for n in wanted)
    feed: dict[str, np.ndarray] = {}
    for name, spec in wanted.items():
        if stepping and name == "input_ids":  # one new token after the cached prompt
            feed[name] = pool["input_ids"][:, -1:]
        elif stepping and name == "attention_mask":
            past = next(v for k, v in pool.items() if k.startswith("past_self_"))
            feed[name] = np.ones((past.shape[0], past.shape[2] + 1), dtype=np.int64)
        elif name in pool:
            feed[name] = pool[name]
        elif name.startswith("decoder_") and name[len("decoder_"):] in pool:
            feed[name] = pool[name[len("decoder_"):]]
        elif name == "question_mask" and "question_embeds" in pool:
            feed[name] = np.ones(pool["question_embeds"].shape[:2], dtype=np.int64)
        else:
            raise ExportError(f"int8 calibration: no data for input {name} ({spec.type}) of this graph")
    return feed


Feeds = Callable[[], Iterator[dict[str, np.ndarray]]]


def _reader(feeds: Feeds) -> Any:
    """ONNX Runtime's CalibrationDataReader over fresh feeds, made a batch at a time (memory: one batch)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = feeds()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

        def rewind(self) -> None:
            self.it = feeds()

    return Reader()


# ---- what stays in float ----------------------------------------------------------------------------
def _constants(proto: Any) -> set[str]:
    names = {i.name for i in proto.graph.initializer}
    names |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def head_nodes(proto: Any) -> list[str]:
    """The last MatMul/Gemm before each graph output: walking back from the outputs through anything but a
    residual join (an Add of two computed tensors), the first MatMul/Gemm met on each path."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    const = _constants(proto)
    heads: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in proto.graph.output]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in QUANTIZED_OPS:
            heads.append(node.name)
            continue
        dynamic = [i for i in node.input if i and i not in const]
        if node.op_type == "Add" and len(dynamic) > 1:
            continue
        stack.extend(dynamic)
    return sorted(heads)


def default_exclusions(proto: Any) -> list[str]:
    """Nodes kept in float beyond the op types never quantized (LayerNorm, Softmax, Conv): the heads."""
    return head_nodes(proto)


def quantizable_nodes(proto: Any, exclude: Sequence[str] = ()) -> list[str]:
    skip = set(exclude)
    return [n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS and n.name not in skip]


def _ensure_names(path: Path) -> Any:
    """Every node named (the quantizer and the exclusion lists address nodes by name)."""
    import onnx

    proto = onnx.load(str(path))
    if any(not n.name for n in proto.graph.node):
        for i, n in enumerate(proto.graph.node):
            n.name = n.name or f"{n.op_type}_{i}"
        onnx.save(proto, str(path))
    return proto


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer advises pre-processing through the root logger on every call: not for our users."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _quantizer_failed(graph: str, exc: BaseException) -> ExportError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ExportError(f"int8: ONNX Runtime's quantizer cannot take graph {graph}: {first}")


# ---- quantizing -------------------------------------------------------------------------------------
def quantize_static_graph(graph: str, fp32: Path, out: Path, feeds: Feeds, method: str,
                          exclude: Sequence[str] | None = None) -> dict[str, Any]:
    """Static QDQ INT8 of one graph file; returns what was kept in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = _ensure_names(fp32)
    kept = sorted(set(default_exclusions(proto)) | set(exclude or ()))
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    try:
        with _quiet():
            quantize_static(str(fp32), str(out), _reader(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=kept, calibrate_method=methods[method],
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    except UpopError:  # our own calibration feeds: their message as it is
        raise
    except Exception as exc:  # the quantizer raises whatever its passes raise: one line naming the graph
        raise _quantizer_failed(graph, exc) from None
    return {"float_nodes": kept, "quantized_nodes": len(quantizable_nodes(proto, kept))}


def quantize_dynamic_graph(graph: str, fp32: Path, out: Path) -> dict[str, Any]:
    """Weight-only INT8 MatMul (activations quantized at run time): no calibration."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = _ensure_names(fp32)
    kept = default_exclusions(proto)
    try:
        with _quiet():
            quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul"], per_channel=False,
                             weight_type=QuantType.QInt8, nodes_to_exclude=kept)
    except Exception as exc:  # as above
        raise _quantizer_failed(graph, exc) from None
    matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in set(kept)]
    return {"float_nodes": kept, "quantized_nodes": len(matmuls)}


def sensitive_nodes(fp32: Path, qdq: Path, feeds: Feeds) -> list[tuple[str, float]]:
    """Quantized nodes of one graph, worst first: the signal-to-quantization-noise ratio (dB) of the INT8 rounding
    at each quantized activation (ONNX Runtime's ``qdq_loss_debug``), given to the MatMul/Gemm nodes reading it."""
    import tempfile

    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    with tempfile.TemporaryDirectory() as tmp:
        acts = []
        for src in (qdq, fp32):  # ONNX Runtime's error report needs the float model's activations too
            aug = Path(tmp) / f"aug-{src.name}"
            modify_model_output_intermediate_tensors(str(src), str(aug))
            acts.append(collect_activations(str(aug), _reader(feeds)))
        errors = compute_activation_error(create_activation_matching(acts[0], acts[1]))
    proto = onnx.load(str(fp32))
    consumers: dict[str, list[str]] = {}
    for n in proto.graph.node:
        if n.op_type in QUANTIZED_OPS:
            for i in n.input:
                consumers.setdefault(i, []).append(n.name)
    ranked: dict[str, float] = {}
    for tensor, err in errors.items():
        for node in consumers.get(tensor, []):
            ranked[node] = min(ranked.get(node, float("inf")), float(err["qdq_err"]))
    return sorted(ranked.items(), key=lambda kv: kv[1])


def quant_parity(graph: Any, path: Path, batches: Sequence[int], seq: int, seed: int = 0) -> list[dict[str, Any]]:
    """Max abs error and cosine of a quantized graph's outputs against PyTorch on the parity inputs. Recorded, not
    enforced: the task metric decides whether an INT8 graph is good enough."""
    import torch

    sess = ort_session(path)
    wanted = {i.name for i in sess.get_inputs()}
    rows = []
    for b in batches:
        torch.manual_seed(seed + b)
        inputs = graph.make_inputs(b, seq)
        with torch.no_grad():
            ref = graph.module(*inputs.values())
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in wanted})
        for name, r, g in zip(graph.outputs, ref, got):
            r64, g64 = r.double().numpy().ravel(), np.asarray(g, dtype=np.float64).ravel()
            denom = float(np.linalg.norm(r64) * np.linalg.norm(g64))
            cos = float(r64 @ g64 / denom) if denom > 0 else 1.0
            rows.append({"batch": b, "output": name, "max_abs": float(np.abs(r64 - g64).max()) if r64.size else 0.0,
                         "cosine": cos})
    return rows


# ---- Q/DQ placed for TensorRT ------------------------------------------------------------------------
#: upop's calibration methods as ModelOpt names them (ModelOpt has no percentile for INT8).
MODELOPT_METHODS = {"minmax": "max", "entropy": "entropy"}


def modelopt_quantizer() -> Any:
    """``modelopt.onnx.quantization`` (NVIDIA ModelOpt's ONNX PTQ, the Q/DQ placement TensorRT builds), or None."""
    try:
        from modelopt.onnx import quantization  # type: ignore[import-not-found]
    except ImportError:
        return None
    return quantization


def quantize_for_tensorrt(graph: str, fp32: Path, out: Path, feeds: Feeds, method: str) -> dict[str, Any]:
    """INT8 Q/DQ of one graph by ModelOpt's ONNX PTQ, calibrated on the same items as the ONNX Runtime INT8 graph
    (all of them at once: ModelOpt takes the calibration data as arrays). The heads stay in float as above."""
    mtq = modelopt_quantizer()
    if mtq is None:
        raise ExportError("ModelOpt's ONNX quantization is not installed (pip install \"nvidia-modelopt[onnx]\")")
    if method not in MODELOPT_METHODS:
        raise ConfigError(f"--calibration-method {method} is not one ModelOpt has for INT8: minmax or entropy")
    batches = list(feeds())
    data = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    kept = default_exclusions(_ensure_names(fp32))
    try:
        with _quiet():
            mtq.quantize(onnx_path=str(fp32), quantize_mode="int8", calibration_data=data,
                         calibration_method=MODELOPT_METHODS[method], calibration_eps=["cpu"],
                         nodes_to_exclude=kept or None, high_precision_dtype="fp32", output_path=str(out))
    except UpopError:
        raise
    except Exception as exc:  # as for ONNX Runtime's quantizer
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"int8: ModelOpt cannot quantize graph {graph}: {first}") from None
    return {"file": out.name, "quantizer": "modelopt", "float_nodes": kept}
