"""ONNX export of a slim checkpoint (or an unpruned model), checked against PyTorch in ONNX Runtime.

Every graph registered for the model's class (``graphs.py``) is exported with the TorchScript
exporter, checked with ``onnx.checker``, then run in ONNX Runtime at several batch sizes next to the PyTorch model:
max abs and relative error per output, and a typed error naming graph, output and tolerance
when a check fails. ``--fp16`` adds FP16 graphs made by ONNX Runtime's maintained converter
(``onnxruntime.transformers.float16``), checked with a looser, documented tolerance.
Attention is exported eager: in ORT it runs faster than an SDPA export.
"""

from __future__ import annotations

import json
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from upop.run.checkpoint import atomic_dir
from upop.errors import ExportError, ParityError  # noqa: F401  (defined with every error, raised and re-exported here)
from upop.run.safety import check_replace

from .record import evaluation_record
from .graphs import export_graphs
from .precision import PrecisionOptions, add_precisions
from .sessions import ort_session

FP32_TOL = 1e-4
#: Opsets the graphs are exported at: 14 is the lowest the attention and layer-norm graphs need here,
#: the TorchScript exporter writes at most 20.
MIN_OPSET, MAX_OPSET = 14, 20
#: FP16 graphs: max abs error ≤ FP16_TOL × (1 + max |reference|) per output.
FP16_TOL = 2e-2




def check_opset(opset: Any) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET} (the exporter's range), got {opset!r}")


@dataclass
class ExportSource:
    model: nn.Module
    adapter: Any
    source: str
    slim: bool


def load_for_export(source: str | Path) -> ExportSource:
    import upop
    from upop.adapters import get_adapter
    from upop.run.checkpoint import is_slim_checkpoint
    from upop.models.hub import load_pretrained

    if is_slim_checkpoint(source):
        model = upop.load(source)
        return ExportSource(model, get_adapter(model), str(source), True)
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ExportError(f"{source} is neither a upop slim checkpoint nor a model folder")
    loaded = load_pretrained(str(source))
    # The resolved folder (a demo name becomes its installed folder): its processor files are copied from there.
    return ExportSource(loaded.model, loaded.adapter, str(loaded.source), False)


def _io_spec(model_proto) -> dict[str, list[dict[str, Any]]]:
    import onnx

    def describe(vi) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return {"inputs": [describe(v) for v in model_proto.graph.input],
            "outputs": [describe(v) for v in model_proto.graph.output]}


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def check_parity(graph, path: Path, batches: tuple[int, ...], seq: int, tol: float, relative_to_scale: bool,
                 seed: int = 0, sess: Any = None) -> list[dict[str, Any]]:
    """Run the ONNX graph and the PyTorch wrapper on the same random inputs; raise on a mismatch. ``sess``: the
    graph in another runtime (anything with ONNX Runtime's ``get_inputs`` and ``run``), else ONNX Runtime's."""
    sess = sess or ort_session(path)
    wanted = [i.name for i in sess.get_inputs()]  # the exporter drops inputs the graph never reads
    results = []
    for b in batches:
        torch.manual_seed(seed + b)
        inputs = graph.make_inputs(b, seq)
        with torch.no_grad():
            ref = _as_tuple(graph.module(*inputs.values()))
        feed = {k: v.numpy() for k, v in inputs.items() if k in wanted}
        got = sess.run(None, feed)
        for name, r, g in zip(graph.outputs, ref, got):
            r = r.float().numpy()
            g = np.asarray(g, dtype=np.float32)
            if r.shape != g.shape:
                raise ExportError(f"graph {graph.name}: output {name} has shape {g.shape} in the runtime, "
                                  f"{r.shape} in PyTorch")
            err = float(np.abs(r - g).max()) if r.size else 0.0
            scale = float(np.abs(r).max()) if r.size else 0.0
            limit = tol * (1 + scale) if relative_to_scale else tol
            rel = err / scale if scale > 0 else 0.0
            results.append({"batch": b, "output": name, "max_abs": err, "max_rel": rel, "tolerance": limit})
            if not err <= limit:
                raise ParityError(graph.name, name, err, limit, b)
    return results


def _source_hash(source: str) -> str | None:
    """sha256 of the source's weights: the slim manifest's, or the model folder's safetensors file."""
    from upop.run.checkpoint import is_slim_checkpoint, read_manifest, sha256_file

    if is_slim_checkpoint(source):
        return read_manifest(source)["weights"]["sha256"]
    weights = Path(source) / "model.safetensors"
    return sha256_file(weights) if weights.is_file() else None


def _special_tokens(config: Any) -> dict[str, int]:
    text = getattr(config, "text_config", None)
    if text is None:
        return {}
    keys = ("bos_token_id", "sep_token_id", "eos_token_id", "pad_token_id")
    out = {k: int(getattr(text, k)) for k in keys if isinstance(getattr(text, k, None), int)}
    if isinstance(getattr(text, "vocab_size", None), int):  # where BLIP's [ENC] row is found (upop.models.enc_token)
        out["text_vocab_size"] = int(text.vocab_size)
    image = getattr(config, "image_token_id", None)  # a decoder VLM's: where the host writes the image features
    return {**out, "image_token_id": int(image)} if isinstance(image, int) else out


def _copy_preprocessing(source: str, dest: Path) -> None:
    """The tokenizer and image processor files travel with the graphs (a deployment needs them)."""
    src = Path(source)
    if not src.is_dir():
        from upop.models.hub import load_processor

        proc = load_processor(source)
        if proc is not None:
            proc.save_pretrained(str(dest))
        return
    for f in src.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "preprocessor", "processor", "special_tokens", "chat_template"))
                            or f.name in ("vocab.txt", "vocab.json", "merges.txt")):
            shutil.copy2(f, dest / f.name)


def export_graph(graph: Any, folder: Path, *, opset: int = 17, seq: int = 12, check_batches: tuple[int, ...] = (1, 3),
                 fp16: bool = False) -> dict[str, Any]:
    """One graph to ``folder/NAME.onnx`` (TorchScript exporter), checked with ``onnx.checker`` and against PyTorch in
    ONNX Runtime; the graph's ``export.json`` entry (its inputs, outputs and parity)."""
    import onnx

    path = folder / f"{graph.name}.onnx"
    example = graph.make_inputs(2, seq)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python-side shape checks: the graphs are checked below instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.module, tuple(example.values()), str(path), input_names=list(example),
                          output_names=graph.outputs, dynamic_axes=graph.dynamic, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    entry = {"name": graph.name, "file": path.name, **_io_spec(proto),
             "parity": check_parity(graph, path, check_batches, seq, FP32_TOL, relative_to_scale=False)}
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(proto, keep_io_types=True)
        hpath = folder / f"{graph.name}.fp16.onnx"
        onnx.save(half, str(hpath))
        entry["fp16"] = {"file": hpath.name, "tolerance_rule": f"max abs <= {FP16_TOL} * (1 + max |ref|)",
                         "parity": check_parity(graph, hpath, check_batches, seq, FP16_TOL, relative_to_scale=True)}
    return entry


def export_onnx(source: str | Path, out_dir: str | Path, *, fp16: bool = False, opset: int = 17,
                check_batches: tuple[int, ...] = (1, 3), seq: int = 12, overwrite: bool = False,
                progress=None, precision: PrecisionOptions | None = None) -> dict[str, Any]:
    """Export every graph of ``source`` to ``out_dir`` with an ``export.json`` manifest; ``precision`` adds the
    INT8 graphs, the deployment table and ``auto``'s choice (``precision.py``)."""
    import onnx
    import onnxruntime

    import upop

    out = Path(out_dir)
    check_opset(opset)
    if precision is not None:
        precision.check()
        fp16 = fp16 or "fp16" in precision.built()
    check_replace(out, overwrite=overwrite, sources=[source])
    loaded = load_for_export(source)
    model = loaded.model.float().eval()
    if hasattr(model, "set_attn_implementation") and getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")
    graphs = export_graphs(model, loaded.adapter)
    manifest: dict[str, Any] = {
        "format": "onnx", "source": loaded.source, "source_sha256": _source_hash(loaded.source),
        "slim": loaded.slim, "family": loaded.adapter.family,
        "model_class": type(model).__name__, "opset": opset, "upop_version": upop.__version__,
        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "machine": platform.machine(), "graphs": [], "task": loaded.adapter.task_of(model),
        "labels": {str(k): v for k, v in (getattr(model.config, "id2label", None) or {}).items()},
        "tokens": _special_tokens(model.config),
        "evaluation": evaluation_record(source, model, loaded.adapter),  # what `upop eval EXPORT_DIR` needs
    }
    with atomic_dir(out) as tmp:
        for graph in graphs:
            if progress:
                progress(f"exporting {graph.name}")
            entry = export_graph(graph, tmp, opset=opset, seq=seq, check_batches=check_batches, fp16=fp16)
            manifest["graphs"].append(entry)
        _copy_preprocessing(loaded.source, tmp)
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
        if precision is not None:
            add_precisions(tmp, manifest, graphs, precision, check_batches, seq, progress)
    return manifest
