"""TensorRT engines from the exported ONNX graphs (TensorRT 10 and 11).

TensorRT 10: precision comes from builder flags (``BuilderFlag.FP16``). TensorRT 11 removed
those flags: networks are strongly typed, so FP16 engines are built from the FP16 ONNX graphs.
Dynamic axes get one optimization profile each (batch from ``--batch MIN:OPT:MAX``, sequence
from ``seq``). A timing cache is kept next to the engines; parser errors name the failing node.

Running engines (``EngineRunner``): inputs and outputs are torch CUDA tensors whose addresses are
given to the execution context; ``execute_async_v3`` runs on a torch stream of the runner's own (on
the default stream TensorRT adds synchronisations of its own, and warns so), and ``timed`` records
torch's CUDA events on that stream. ``engine_latency`` builds a fixed-shape engine for one module
(calibration of hardware profiles with ``--runtime trt``); a network whose inputs are all static gets
no optimization profile.

Not run on any machine of this project (TensorRT is not installed anywhere here): the module
is type-checked against ``tensorrt-stubs`` and its tests skip without TensorRT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upop.checkpoint import atomic_dir
from upop.errors import UpopError
from upop.safety import check_replace

from .registry import register
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
    ``upop.latency.feed_shape``, so profiling feeds fit the profile)."""
    from upop.latency import is_batch_axis

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
            lo.append(r.min)
            mid.append(r.opt)
            hi.append(r.max)
        shapes[inp["name"]] = (tuple(lo), tuple(mid), tuple(hi))
    return shapes


def build_engine(onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]], *, fp16: bool,
                 timing_cache: Path, workspace_gib: float = 4.0) -> bytes:
    import tensorrt as trt  # typed by tensorrt-stubs; call require_tensorrt() first

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = trt_major(trt)
    flags = 0
    if major >= 11:
        # TensorRT 11 networks are strongly typed: the ONNX file's types decide the precision.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node {err.node()} ({err.node_name()}, {err.node_operator()}): {err.desc()}")
        raise TensorRTBuildError(f"TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16 and major < 11:
        config.set_flag(trt.BuilderFlag.FP16)
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


def has_dynamic_input(network: Any) -> bool:
    """Whether any input of the parsed network has a dimension left open (-1)."""
    for i in range(network.num_inputs):
        dims = network.get_input(i).shape
        if any(dims[k] < 0 for k in range(len(dims))):
            return True
    return False


@register("trt")
def export_trt(source: str | Path, out_dir: str | Path, *, fp16: bool = False, batch: str = "1:8:32",
               seq: str = "1:32:64", opset: int = 17, overwrite: bool = False, progress=None) -> dict[str, Any]:
    """ONNX first (with its parity checks), then one engine per graph, with ``engines.json``."""
    trt = require_tensorrt()
    from .onnx import export_onnx

    brange, srange = ShapeRange.parse(batch), ShapeRange.parse(seq)
    out = Path(out_dir)
    check_replace(out, overwrite=overwrite, sources=[source])
    with atomic_dir(out) as tmp:
        manifest = export_onnx(source, tmp / "onnx", fp16=fp16, opset=opset, progress=progress)
        engines = []
        cache = tmp / "timing.cache"
        for g in manifest["graphs"]:
            use_fp16_onnx = fp16 and trt_major(trt) >= 11
            onnx_file = tmp / "onnx" / (g["fp16"]["file"] if use_fp16_onnx else g["file"])
            shapes = profile_shapes(g["inputs"], brange, srange)
            if progress:
                progress(f"building engine {g['name']}")
            engine = build_engine(onnx_file, shapes, fp16=fp16, timing_cache=cache)
            (tmp / f"{g['name']}.engine").write_bytes(engine)
            engines.append({"name": g["name"], "file": f"{g['name']}.engine", "onnx": f"onnx/{onnx_file.name}",
                            "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
                            "inputs": g["inputs"], "outputs": g["outputs"]})
        meta = {"format": "tensorrt", "tensorrt": str(trt.__version__), "fp16": fp16,
                "strongly_typed": trt_major(trt) >= 11, "batch": batch, "seq": seq, "engines": engines,
                "source": str(source)}
        (tmp / "engines.json").write_text(json.dumps(meta, indent=2))
    return meta


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

        from upop.latency import time_fn

        with torch.cuda.stream(self.stream):
            return time_fn(self.run, warmup, runs, cuda=True)


def engine_latency(module: Any, inputs: dict[str, Any], *, fp16: bool, warmup: int, runs: int,
                   pick: Any = None) -> list[float]:
    """Times (ms) of ``module`` exported to ONNX with the inputs' static shapes, built into a TensorRT
    engine for exactly those shapes, and run with CUDA events."""
    import tempfile

    from .static_onnx import export_static_onnx

    trt = require_tensorrt()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.onnx"
        cpu = export_static_onnx(module, inputs, path, pick)
        if fp16 and trt_major(trt) >= 11:  # strongly typed: the graph's own types set the precision
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))
        shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        for k, v in cpu.items():
            dims = tuple(int(d) for d in v.shape)
            shapes[k] = (dims, dims, dims)
        engine = build_engine(path, shapes, fp16=fp16, timing_cache=Path(tmp) / "timing.cache")
    runner = EngineRunner(engine)
    runner.bind(cpu)
    return runner.timed(warmup, runs)


def profile_engines(engine_dir: str | Path, batches: list[int], seq: int, warmup: int, runs: int) -> list[dict[str, Any]]:
    """Latency of every engine of a ``upop export --format trt`` folder: one row per engine and batch."""
    import torch

    from upop.latency import feed_shape

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
