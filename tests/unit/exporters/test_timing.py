"""Timing in ONNX Runtime and TensorRT on a GPU, checked here against stand-ins of the two libraries: the
provider really in use, the GPU each rank's session runs on, IO binding, TensorRT's own stream, no
optimization profile for static inputs, and the module left where it was after its static export."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from upop.exporters import sessions, static_onnx, tensorrt, timing
from upop.latency.measure import latency_rows

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


class _Binding:
    def __init__(self, log: dict) -> None:
        self.log = log

    def bind_ortvalue_input(self, name, value):
        self.log.setdefault("inputs", []).append((name, value))

    def bind_output(self, name, device, device_id):
        self.log.setdefault("outputs", []).append((name, device, device_id))

    def get_outputs(self):
        return ["y-on-gpu"]

    def bind_ortvalue_output(self, name, value):
        self.log.setdefault("reused", []).append((name, value))


class _Session:
    def __init__(self, path, opts, providers, used, log):
        self.asked, self.used, self.log = providers, used, log
        log.setdefault("sessions", []).append(self)

    def get_providers(self):
        return self.used

    def get_inputs(self):
        return [SimpleNamespace(name="x")]

    def get_outputs(self):
        return [SimpleNamespace(name="y")]

    def run(self, names, feed):
        self.log["run"] = self.log.get("run", 0) + 1

    def io_binding(self):
        return _Binding(self.log)

    def run_with_iobinding(self, binding):
        self.log["bound_runs"] = self.log.get("bound_runs", 0) + 1


def _fake_ort(monkeypatch, used: list[str]) -> dict:
    """onnxruntime with a CUDA provider on offer whose sessions run on ``used``."""
    log: dict = {}
    ort = types.ModuleType("onnxruntime")
    ort.SessionOptions = lambda: SimpleNamespace()  # type: ignore[attr-defined]
    ort.get_available_providers = lambda: list(CUDA)  # type: ignore[attr-defined]
    ort.InferenceSession = lambda path, opts, providers: _Session(path, opts, providers, used, log)  # type: ignore[attr-defined]

    def from_numpy(arr, device, device_id):
        log.setdefault("copied", []).append((arr.shape, device, device_id))
        return f"{device}:{device_id}"

    ort.OrtValue = SimpleNamespace(ortvalue_from_numpy=from_numpy)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setattr(sessions, "_said", set())
    return log


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x)


def test_a_cuda_provider_that_fell_back_is_said_in_one_line_and_its_row_says_cpu(monkeypatch, capsys):
    log = _fake_ort(monkeypatch, used=["CPUExecutionProvider"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    run = timing.ort_runtime(torch.device("cuda")).prepare(_Net(), {"x": torch.randn(2, 4)})
    run()
    assert run.device == "cpu" and log["run"] == 1 and "bound_runs" not in log
    # this rank's GPU was asked for (LOCAL_RANK), not GPU 0
    assert log["sessions"][0].asked == [("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]
    timing.ort_runtime(torch.device("cuda")).prepare(_Net(), {"x": torch.randn(2, 4)})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "CPU" in lines[0]  # once, however many sessions
    row = {"p50_ms": 1.0, "p90_ms": 1.0, "runs": 5.0, "device": run.device}
    assert latency_rows({"ort": {1: row}}, {"ort": {1: row}}, torch.device("cuda"))[0]["device"] == "cpu"


def test_profile_rows_say_cpu_when_the_cuda_provider_fell_back(monkeypatch, tmp_path, capsys):
    _fake_ort(monkeypatch, used=["CPUExecutionProvider"])
    (tmp_path / "export.json").write_text(json.dumps({"graphs": [
        {"name": "vision", "file": "vision.onnx", "inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}]}]}))
    rows = timing.profile_ort(tmp_path, "m", [1, 2], device="cuda:0", warmup=1, runs=2)
    assert {r.device for r in rows} == {"cpu"}
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_ort_on_cuda_is_timed_with_its_inputs_on_the_device_and_io_binding(monkeypatch):
    """As PyTorch is timed: inputs copied to the GPU once, outputs left there, no host↔device copy per run."""
    log = _fake_ort(monkeypatch, used=CUDA)
    sess = sessions.ort_session("m.onnx", CUDA, device_id=3)
    run = sessions.ort_call(sess, {"x": np.ones((2, 4), dtype=np.float32)}, 3)
    for _ in range(4):
        run()
    assert "run" not in log and log["bound_runs"] == 5  # one to place the outputs, then the timed ones
    assert log["copied"] == [((2, 4), "cuda", 3)] and log["inputs"] == [("x", "cuda:3")]
    assert log["outputs"] == [("y", "cuda", 3)] and log["reused"] == [("y", "y-on-gpu")]
    assert sessions.device_in_use(sess, CUDA) == "cuda"


def test_a_session_runs_on_the_gpu_of_its_device_or_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert sessions.cuda_device_id(torch.device("cuda", 2)) == 2 and sessions.cuda_device_id("cuda:1") == 1
    assert sessions.cuda_device_id("cuda") == 5 and sessions.cuda_device_id(torch.device("cuda")) == 5


# -- TensorRT -----------------------------------------------------------------------------------------------

def _fake_trt(input_shape: list[int]) -> tuple[types.ModuleType, dict]:
    """Just what ``build_engine`` and ``EngineRunner`` call, recording it."""
    log: dict = {"profiles": 0, "streams": []}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.8.0"  # type: ignore[attr-defined]
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})  # type: ignore[attr-defined]
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE=0)  # type: ignore[attr-defined]
    trt.BuilderFlag = SimpleNamespace(FP16=1)  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)  # type: ignore[attr-defined]
    trt.Dims = list  # type: ignore[attr-defined]
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(shape=list(input_shape)))
    profile = SimpleNamespace(set_shape=lambda *a: None)

    def add_profile(p):
        log["profiles"] += 1

    config = SimpleNamespace(set_memory_pool_limit=lambda *a: None, set_flag=lambda f: None,
                             create_timing_cache=lambda b: "cache", set_timing_cache=lambda c, ignore: None,
                             add_optimization_profile=add_profile,
                             get_timing_cache=lambda: SimpleNamespace(serialize=lambda: b"timing"))
    builder = SimpleNamespace(create_network=lambda flags: network, create_builder_config=lambda: config,
                              create_optimization_profile=lambda: profile,
                              build_serialized_network=lambda n, c: b"engine")
    trt.Builder = lambda logger: builder  # type: ignore[attr-defined]
    trt.OnnxParser = lambda n, logger: SimpleNamespace(parse_from_file=lambda p: True)  # type: ignore[attr-defined]

    def execute(handle):
        log["streams"].append(handle)
        return True

    engine = SimpleNamespace(num_io_tensors=0, create_execution_context=lambda: SimpleNamespace(execute_async_v3=execute))
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda b: engine)  # type: ignore[attr-defined]
    return trt, log


@pytest.mark.parametrize("shape,profiles", [([1, 3, 32, 32], 0), ([-1, 3, 32, 32], 1)], ids=["static", "dynamic"])
def test_an_optimization_profile_only_for_dynamic_inputs(monkeypatch, tmp_path, shape, profiles):
    trt, log = _fake_trt(shape)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    dims = (1, 3, 32, 32)
    engine = tensorrt.build_engine(tmp_path / "m.onnx", {"x": (dims, dims, dims)},
                                   timing_cache=tmp_path / "timing.cache")
    assert engine == b"engine" and log["profiles"] == profiles


def test_engines_run_on_a_stream_of_their_own(monkeypatch):
    """Not the default stream, on which TensorRT adds synchronisations of its own (and warns)."""
    trt, log = _fake_trt([1, 4])
    monkeypatch.setattr(tensorrt, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: SimpleNamespace(cuda_stream=4242))
    runner = tensorrt.EngineRunner(b"engine")
    runner.run()
    runner.run()
    assert log["streams"] == [4242, 4242]


def test_the_static_export_leaves_the_module_on_its_device(monkeypatch, tmp_path):
    """The export runs on the CPU; the module goes back (``engine_latency`` and the ORT timings then time or train
    a model still on its GPU). Here the module's home is made ``meta`` to see it go back."""
    net = _Net()
    monkeypatch.setattr(static_onnx, "_device_of", lambda module: torch.device("meta"))
    static_onnx.export_static_onnx(net, {"x": torch.randn(2, 4)}, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file() and net.lin.weight.device.type == "meta"
