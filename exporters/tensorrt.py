"""TensorRT engines from the exported ONNX graphs (TensorRT 10 and 11).

Networks are strongly typed (TensorRT 10's ``STRONGLY_TYPED`` flag; TensorRT 11's only mode, which removed
the builder's precision flags): an engine's precision is its ONNX file's, so FP16 engines are built from the
FP16 ONNX graphs and INT8 engines from the INT8 Q/DQ graphs, and no builder precision flag is ever set.
Dynamic axes get one optimization profile each (batch from ``--batch MIN:OPT:MAX``, sequence
from ``seq``). A timing cache is kept next to the engines; parser errors name the failing node.

Running engines (``EngineRunner``): inputs and outputs are torch CUDA tensors whose addresses are
given to the execution context; ``execute_async_v3`` runs on a torch stream of the runner's own (on
the default stream TensorRT adds synchronisations of its own, and warns so), and ``timed`` records
torch's CUDA events on that stream. ``engine_latency`` builds a fixed-shape engine for one module
(calibration of hardware profiles with ``--runtime tensorrt``); a network whose inputs are all static gets
no optimization profile.

Not run on any machine of this project (TensorRT is not installed anywhere here): the module
is type-checked against ``tensorrt-stubs`` and its tests skip without TensorRT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upop.run.checkpoint import atomic_dir
from upop.errors import UpopError
from upop.run.safety import check_replace

from upop.errors import TensorRTUnavailable, TensorRTBuildError  # noqa: F401  (defined with every error, raised and re-exported here)




@dataclass(frozen=True)
class ShapeRange:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "ShapeRange":
        try:
            parts = [int(x) for x in text.split(":")]
        except ValueError:
            parts = []
        if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
            raise UpopError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
        return cls(*parts)


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or one clear error saying what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable('TensorRT is not installed: pip install "upop[trt]" (needs an NVIDIA GPU and driver)') from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines are built on an NVIDIA GPU, and none is available here")
    return trt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def profile_shapes(io: list[dict[str, Any]], batch: ShapeRange, seq: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes per input: item axes take ``batch``, token axes ``seq`` (the rule of
    ``upop.latency.timing.feed_shape``, so profiling feeds fit the profile)."""
    from upop.latency.timing import GROWN_AXES, is_batch_axis

    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for inp in io:
        lo: list[int] = []
        mid: list[int] = []
        hi: list[int] = []
        for d in inp["shape"]:
            if isinstance(d, int) and d > 0:
                r = ShapeRange(d, d, d)
            else:
                r = batch if is_batch_axis(d) else seq
                if d in GROWN_AXES:  # a decode step's mask: the past and the new token
                    r = ShapeRange(seq.min + 1, seq.opt + 1, seq.max + 1)
            lo.append(r.min)
            mid.append(r.opt)
            hi.append(r.max)
        shapes[inp["name"]] = (tuple(lo), tuple(mid), tuple(hi))
    return shapes


def strongly_typed_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network: the ONNX file's types (FP16 tensors, INT8 Q/DQ)
    decide every precision, and no builder precision flag is set. TensorRT 10 asks for it with
    ``STRONGLY_TYPED``; in TensorRT 11 it is the only mode (the flag is set where the enum still has it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]], *, timing_cache: Path,
                 workspace_gib: float = 4.0) -> bytes:
    """A strongly typed engine of ``onnx_path``: its precision is the file's (FP32, FP16 or INT8 Q/DQ)."""
    import tensorrt as trt  # typed by tensorrt-stubs; call require_tensorrt() first

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node {err.node()} ({err.node_name()}, {err.node_operator()}): {err.desc()}")
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    if has_dynamic_input(network):  # a profile on fully static inputs is refused or ignored: none then
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in shapes.items():
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(mid)), trt.Dims(list(hi)))
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine for {onnx_path.name} (see the log above)")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


TRT_PRECISIONS = ("fp32", "fp16", "int8")


def _trt_precision(fp16: bool, precision: Any) -> str:
    """fp32, fp16 or int8: the ONNX graphs the engines are built from (``precision``: PrecisionOptions or None)."""
    asked = getattr(precision, "precision", None) or ("fp16" if fp16 else "fp32")
    if asked not in TRT_PRECISIONS:
        raise UpopError(f"--format tensorrt builds {', '.join(TRT_PRECISIONS)} engines, not {asked} (int8-dynamic is "
                        "ONNX Runtime's own operators; auto measures in ONNX Runtime: use --format onnxruntime)")
    return asked


def has_dynamic_input(network: Any) -> bool:
    """Whether any input of the parsed network has a dimension left open (-1)."""
    for i in range(network.num_inputs):
        dims = network.get_input(i).shape
        if any(dims[k] < 0 for k in range(len(dims))):
            return True
    return False


def export_trt(source: str | Path, out_dir: str | Path, *, fp16: bool = False, batch: str = "1:8:32",
               seq: str = "1:32:64", opset: int = 17, overwrite: bool = False, progress=None,
               precision: Any = None) -> dict[str, Any]:
    """ONNX first (with its parity checks, and the INT8 Q/DQ graphs for int8: ``precision`` is a
    ``PrecisionOptions``), then one strongly typed engine per graph from the precision's ONNX file, with
    ``engines.json``."""
    trt = require_tensorrt()
    from .onnx import export_onnx

    brange, srange = ShapeRange.parse(batch), ShapeRange.parse(seq)
    mode = _trt_precision(fp16, precision)
    out = Path(out_dir)
    check_replace(out, overwrite=overwrite, sources=[source])
    with atomic_dir(out) as tmp:
        manifest = export_onnx(source, tmp / "onnx", fp16=mode == "fp16", opset=opset, progress=progress,
                               precision=precision if mode == "int8" else None)
        if mode == "int8":
            _tensorrt_qdq(tmp / "onnx", manifest, precision, progress)
        engines = []
        cache = tmp / "timing.cache"
        for g in manifest["graphs"]:
            onnx_file = tmp / "onnx" / (g["file"] if mode == "fp32" else g[mode]["file"])
            if mode == "int8" and "int8-trt" in g:
                onnx_file = tmp / "onnx" / g["int8-trt"]["file"]
            shapes = profile_shapes(g["inputs"], brange, srange)
            if progress:
                progress(f"building engine {g['name']} ({mode}, strongly typed)")
            engine = build_engine(onnx_file, shapes, timing_cache=cache)
            (tmp / f"{g['name']}.engine").write_bytes(engine)
            engines.append({"name": g["name"], "file": f"{g['name']}.engine", "onnx": f"onnx/{onnx_file.name}",
                            "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
                            "inputs": g["inputs"], "outputs": g["outputs"]})
        meta = {"format": "tensorrt", "tensorrt": str(trt.__version__), "precision": mode, "fp16": mode == "fp16",
                "strongly_typed": True, "batch": batch, "seq": seq, "engines": engines,
                "calibration": manifest.get("calibration"), "int8_quantizer": manifest.get("int8_quantizer"),
                "source": str(source)}
        (tmp / "engines.json").write_text(json.dumps(meta, indent=2))
    return meta


def _tensorrt_qdq(folder: Path, manifest: dict[str, Any], precision: Any, progress: Any) -> None:
    """INT8 Q/DQ graphs placed for TensorRT by ModelOpt's ONNX PTQ where it is installed (``int8-trt`` in
    ``export.json``); without it the engines are built from ONNX Runtime's INT8 graphs, whose Q/DQ are
    symmetric with zero-point 0, the form TensorRT's explicit quantization takes."""
    import functools

    from .quantize import CalibrationData, modelopt_quantizer, quantize_for_tensorrt

    if modelopt_quantizer() is None:
        manifest["int8_quantizer"] = "onnxruntime (ModelOpt not installed)"
        return
    calib = CalibrationData(precision.task, precision.calibration)  # the same seeded draw as the ONNX graphs
    files = [(g["name"], folder / g["file"]) for g in manifest["graphs"]]
    for g in manifest["graphs"]:
        if progress:
            progress(f"quantizing {g['name']} for TensorRT (ModelOpt)")
        out = folder / f"{g['name']}.int8-trt.onnx"
        g["int8-trt"] = quantize_for_tensorrt(g["name"], folder / g["file"], out,
                                              functools.partial(calib.feeds, files, g["name"]), calib.spec.method)
    manifest["int8_quantizer"] = "modelopt"
    (folder / "export.json").write_text(json.dumps(manifest, indent=2))


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8,
             trt.DataType.BF16: torch.bfloat16}
    if dtype not in table:
        raise TensorRTBuildError(f"engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class EngineRunner:
    """One deserialized engine with its execution context, fed with torch CUDA tensors, run on a stream of its
    own (``stream``)."""

    def __init__(self, engine_bytes: bytes):
        import torch

        trt = require_tensorrt()
        self.trt = trt
        self.stream = torch.cuda.Stream()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise TensorRTBuildError("TensorRT could not load the engine (built by another TensorRT version or GPU?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._keep: dict[str, Any] = {}

    def input_dtype(self, name: str) -> Any:
        return _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))

    def bind(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Set the input shapes and addresses, allocate the outputs; returns the output tensors."""
        import torch

        for name in self.inputs:
            t = feed[name].to("cuda", self.input_dtype(name)).contiguous()
            t.record_stream(self.stream)  # made on the current stream, read on ours: not reused while in flight
            self._keep[name] = t
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise TensorRTBuildError(f"input {name} of shape {list(t.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)), device="cuda")
            out.record_stream(self.stream)
            self._keep[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        self.stream.wait_stream(torch.cuda.current_stream())  # the inputs were copied on the current stream
        return outs

    def run(self) -> None:
        """Enqueue on the runner's stream."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTBuildError("TensorRT failed to run the engine")

    def timed(self, warmup: int, runs: int) -> list[float]:
        """Times (ms) of ``run``, by CUDA events recorded on the runner's stream."""
        import torch

        from upop.latency.timing import time_fn

        with torch.cuda.stream(self.stream):
            return time_fn(self.run, warmup, runs, cuda=True)


def engine_latency(module: Any, inputs: dict[str, Any], *, fp16: bool, warmup: int, runs: int,
                   pick: Any = None) -> list[float]:
    """Times (ms) of ``module`` exported to ONNX with the inputs' static shapes, built into a TensorRT
    engine for exactly those shapes, and run with CUDA events."""
    import tempfile

    from .static_onnx import export_static_onnx

    require_tensorrt()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.onnx"
        cpu = export_static_onnx(module, inputs, path, pick)
        if fp16:  # strongly typed: the graph's own types set the precision
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))
        shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        for k, v in cpu.items():
            dims = tuple(int(d) for d in v.shape)
            shapes[k] = (dims, dims, dims)
        engine = build_engine(path, shapes, timing_cache=Path(tmp) / "timing.cache")
    runner = EngineRunner(engine)
    runner.bind(cpu)
    return runner.timed(warmup, runs)


def profile_engines(engine_dir: str | Path, batches: list[int], seq: int, warmup: int, runs: int) -> list[dict[str, Any]]:
    """Latency of every engine of a ``upop export --format tensorrt`` folder: one row per engine and batch."""
    import torch

    from upop.latency.timing import feed_shape

    require_tensorrt()
    meta = json.loads((Path(engine_dir) / "engines.json").read_text())
    rows = []
    for e in meta["engines"]:
        runner = EngineRunner((Path(engine_dir) / e["file"]).read_bytes())
        for b in batches:
            feed = {}
            for spec in e["inputs"]:
                shape = feed_shape(spec["shape"], b, seq)
                dtype = runner.input_dtype(spec["name"])
                feed[spec["name"]] = (torch.ones(shape, dtype=dtype) if not dtype.is_floating_point
                                      else torch.randn(shape).to(dtype))
            runner.bind(feed)
            rows.append({"graph": e["name"], "batch": b, "ms": runner.timed(warmup, runs)})
    return rows
