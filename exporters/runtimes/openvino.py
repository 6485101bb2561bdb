"""OpenVINO (``pip install "upop[openvino]"``): ``upop export --format openvino`` converts the ONNX graphs of an
ONNX export to OpenVINO IR (``<graph>.xml`` / ``.bin``) and checks each compiled IR against PyTorch;
``upop profile --runtime openvino``, calibration, ``upop eval --runtime openvino`` and the compress report run
them on the CPU.

The IR is converted once (``openvino.convert_model`` then ``save_model``) rather than reading the ONNX files
at every start: the IR is what OpenVINO deploys, it loads without the ONNX frontend, and its weights are kept in
FP32 (``compress_to_fp16=False``; ``save_model`` halves them by default). The ONNX export stays beside it in
``onnx/`` (its export.json carries the task, tokens, labels and evaluation record every runtime reads).
Inference is pinned to FP32 (``INFERENCE_PRECISION_HINT``): on a CPU with bf16 or AMX OpenVINO would otherwise
pick bf16, and the parity and the timing would be of another precision than the one asked.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from upop.errors import ConfigError, ExportError, ExportFolderError

from ..registry import Backend, register
from ..runtime import GraphModel

MANIFEST = "openvino.json"
DEVICE = "CPU"
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


class _Port:
    def __init__(self, name: str):
        self.name = name


class OvSession:
    """One compiled graph, called like an ONNX Runtime session (``get_inputs``, ``run(None, feed)``), so the
    parity check and the synthetic feed of timing serve both."""

    def __init__(self, path: str | Path, names: Iterable[str] = (), device: str = DEVICE):
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(path), device, FP32)
        self.request = self.compiled.create_infer_request()
        self.names = set(names)

    def _name(self, port: Any) -> str:
        """The port's ONNX name. A port has several (the converter merges an input with the tensor of the node
        that reads it, e.g. ``/vision_model/embeddings/Cast_output_0``) and ``get_any_name`` picks any."""
        given = port.get_names()
        return next((n for n in sorted(given) if n in self.names), None) or \
            min(given, key=lambda n: (n.startswith("/"), n))

    def get_inputs(self) -> list[_Port]:
        return [_Port(self._name(p)) for p in self.compiled.inputs]

    def get_outputs(self) -> list[_Port]:
        return [_Port(self._name(p)) for p in self.compiled.outputs]

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.asarray(result[p]) for p in self.compiled.outputs]

    def call(self, feed: dict[str, np.ndarray]) -> Callable[[], Any]:
        """One timed run on a request of its own (several feeds may be timed in turns), its input tensors set
        once, so a run times the model, not the copies."""
        request = self.compiled.create_infer_request()
        for name, value in feed.items():
            request.set_tensor(name, _tensor(value))
        infer = request.infer

        def run() -> Any:
            return infer()

        run.device = "cpu"  # type: ignore[attr-defined]  # the report's row says where it ran
        return run


def _tensor(value: np.ndarray) -> Any:
    import openvino as ov

    return ov.Tensor(np.ascontiguousarray(value))


class OvModel(GraphModel):
    """The IR graphs of an OpenVINO export folder (or the ONNX graphs of an ONNX export, read directly)."""

    def __init__(self, folder: str | Path):
        from ..runtime import read_export_manifest

        self.dir = Path(folder)
        own = (self.dir / MANIFEST).is_file()
        self.onnx_dir = self.dir / "onnx" if own else self.dir
        self.manifest = read_export_manifest(self.onnx_dir)
        files = _ir_files(self.dir) if own else {g["name"]: self.dir / g["file"] for g in self.manifest["graphs"]}
        names = {g["name"]: _io_names(g) for g in self.manifest["graphs"]}
        self.sessions = {}
        for name, path in files.items():
            try:
                self.sessions[name] = OvSession(path, names.get(name, []))
            except RuntimeError as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ExportFolderError(f"{path} cannot be loaded by OpenVINO (damaged?): {first[:200]}") from None

    def providers_used(self) -> dict[str, list[str]]:
        return {k: [f"OpenVINO {DEVICE}"] for k in self.sessions}

    def input_names(self, graph: str) -> list[str]:
        self._check_graph(graph)
        return [p.name for p in self.sessions[graph].get_inputs()]

    def output_names(self, graph: str) -> list[str]:
        self._check_graph(graph)
        return [p.name for p in self.sessions[graph].get_outputs()]

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.sessions[graph].run(None, self.feed(graph, inputs))


def _io_names(entry: dict[str, Any]) -> list[str]:
    """The input and output names of an export.json graph."""
    return [p["name"] for key in ("inputs", "outputs") for p in entry.get(key, []) if isinstance(p, dict) and "name" in p]


def _ir_files(folder: Path) -> dict[str, Path]:
    """Graph name → its IR file, from ``openvino.json`` (read with the depth limit: it may come from anywhere)."""
    from upop.run.safety import member, read_json

    meta = read_json(folder / MANIFEST, ExportFolderError)
    graphs = meta.get("graphs") if isinstance(meta, dict) else None
    if not isinstance(graphs, list) or not all(isinstance(g, dict) and isinstance(g.get("name"), str) for g in graphs):
        raise ExportFolderError(f"{folder / MANIFEST} is damaged (no list of named graphs)")
    return {g["name"]: member(folder, g.get("file"), f"graph {g['name']} IR file", ExportFolderError) for g in graphs}


def convert(onnx_dir: Path, manifest: dict[str, Any], dest: Path, progress: Callable[[str], None] | None) -> list[dict]:
    """Every ONNX graph of the export as FP32 IR in ``dest``."""
    import openvino as ov

    out = []
    for g in manifest["graphs"]:
        if progress:
            progress(f"converting {g['name']} to OpenVINO IR")
        ov.save_model(ov.convert_model(str(onnx_dir / g["file"])), str(dest / f"{g['name']}.xml"),
                      compress_to_fp16=False)
        out.append({"name": g["name"], "file": f"{g['name']}.xml", "weights": f"{g['name']}.bin"})
    return out


def check_ir(source: str | Path, folder: Path, graphs: list[dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Each compiled IR against the PyTorch graph it came from, by the ONNX export's own rule and tolerance."""
    from ..graphs import export_graphs
    from ..onnx import FP32_TOL, check_parity, load_for_export

    loaded = load_for_export(source)
    modules = {g.name: g for g in export_graphs(loaded.model.float().eval(), loaded.adapter)}
    names = {g["name"]: _io_names(g) for g in manifest["graphs"]}
    for entry in graphs:
        path = folder / entry["file"]
        entry["parity"] = check_parity(modules[entry["name"]], path, (1, 3), 12, FP32_TOL, relative_to_scale=False,
                                       sess=OvSession(path, names[entry["name"]]))


def time_graphs(folder: str | Path, target: str, batches: list[int], warmup: int, runs: int) -> list[Any]:
    """p50/p90 rows of every graph of an export folder at every batch: synthetic inputs, one request each."""
    from upop.latency.timing import make_run, time_fn

    from ..sessions import synthetic_feed

    model = OvModel(folder)
    out = []
    for g in model.manifest["graphs"]:
        sess = model.sessions[g["name"]]
        for b in batches:
            ms = time_fn(sess.call(synthetic_feed(g, sess, b)), warmup, runs, cuda=False)
            out.append(make_run(target, OpenVINO.name, "cpu", "fp32", g["name"], b, ms, f"OpenVINO {DEVICE}"))
    return out


def ov_runtime() -> Any:
    """The compress report's (and calibration's) OpenVINO measurement: the module exported to ONNX at the
    inputs' shapes, compiled once per model and batch."""
    import os

    from upop.latency.measure import Runtime

    from ..static_onnx import export_static_onnx

    def first_tensor(out: Any) -> Any:
        import torch

        if isinstance(out, torch.Tensor):
            return out
        return next(v for v in (out.values() if hasattr(out, "values") else out) if isinstance(v, torch.Tensor))

    def prepare(model: Any, inputs: dict[str, Any]) -> Callable[[], Any]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            cpu_inputs = export_static_onnx(model, inputs, path, first_tensor)
            sess = OvSession(path, list(cpu_inputs))  # compiled in memory: the file may go
        return sess.call({p.name: cpu_inputs[p.name].numpy() for p in sess.get_inputs()})

    return Runtime(prepare, cuda_events=False)


class OpenVINO(Backend):
    name, title, package, extra = "openvino", "OpenVINO", "openvino", "openvino"
    exports, devices, in_report = True, ("cpu",), True

    def export(self, source: str | Path, out_dir: str | Path, *, opset: int = 17, overwrite: bool = False,
               progress: Callable[[str], None] | None = None, **_: Any) -> dict[str, Any]:
        """The ONNX export (in ``onnx/``, with its own parity) and its graphs as IR, each checked against PyTorch."""
        import openvino as ov

        from upop.run.checkpoint import atomic_dir
        from upop.run.safety import check_replace

        from ..onnx import export_onnx

        self.require()
        out = Path(out_dir)
        check_replace(out, overwrite=overwrite, sources=[source])
        with atomic_dir(out) as tmp:
            manifest = export_onnx(source, tmp / "onnx", opset=opset, progress=progress)
            graphs = convert(tmp / "onnx", manifest, tmp, progress)
            if progress:
                progress("checking the IR against PyTorch")
            check_ir(source, tmp, graphs, manifest)
            meta = {"format": self.name, "openvino": ov.get_version(), "device": DEVICE, "precision": "fp32",
                    "graphs": graphs, "source": str(source)}
            (tmp / MANIFEST).write_text(json.dumps(meta, indent=2))
        return meta

    def takes_batch(self, batch: str | None, precision: str | None) -> str | None:
        if batch is not None:
            raise ConfigError(f"--batch does not apply to --format {self.name}: its graphs take any batch size")
        return None

    def summary(self, manifest: dict[str, Any], source: str, out_dir: Path, opset: int) -> list[Any]:
        worst = max((p["max_abs"] for g in manifest["graphs"] for p in g["parity"]), default=0.0)
        return [f"wrote {len(manifest['graphs'])} OpenVINO IR graph(s) to {out_dir} (max abs vs PyTorch {worst:.2e})"]

    def profile(self, target: str, batches: list[int], device: str, precision: str, warmup: int,
                runs: int) -> list[Any]:
        self.require()
        self.check_device(device)
        if precision != "fp32":
            raise ConfigError(f"OpenVINO is timed in FP32 here (--precision fp32), not {precision}")
        folder = Path(target)
        if self.owns(folder) or (folder / "export.json").is_file():  # its IR, or an ONNX export read directly
            return time_graphs(folder, target, batches, warmup, runs)
        with tempfile.TemporaryDirectory() as tmp:
            self.export(target, Path(tmp) / "ov")
            return time_graphs(Path(tmp) / "ov", target, batches, warmup, runs)

    def block_timer(self, device: Any, precision: str) -> Any:
        from upop.latency.calibrate import runtime_timer

        self.require()
        self.check_device(device.type)
        return runtime_timer(ov_runtime())

    def report_runtime(self, device: Any) -> Any:
        return ov_runtime()

    def owns(self, folder: Path) -> bool:
        return (folder / MANIFEST).is_file()

    def open_graphs(self, folder: Path, device: str) -> Any:
        self.require()
        self.check_device(device)
        if not self.owns(folder) and not (folder / "export.json").is_file():
            raise ExportError(f"{folder} is neither an OpenVINO nor an ONNX export folder")
        model = OvModel(folder)
        return model, model.onnx_dir, None


register(OpenVINO())
