"""OpenVINO, the one-file runtime: a slim model exports to IR that matches PyTorch, is profiled, evaluated
and measured in the compress report (skipped with the reason where the openvino package is absent)."""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import upop
from upop.adapters import get_adapter
from upop.exporters import backend
from upop.exporters.graphs import export_graphs
from upop.exporters.onnx import FP32_TOL
from upop_cli.app import app

from ....conftest import batches_for, build_tiny

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason='needs OpenVINO: pip install "upop[openvino]"')
#: one model class of each family (the graphs differ by family, not by its classes' heads)
ONE_PER_FAMILY = [("vit", "ViTForImageClassification"), ("clip", "CLIPModel"), ("siglip", "SiglipModel"),
                  ("blip", "BlipForImageTextRetrieval")]


def _slim(family, class_name, root):
    model = build_tiny(family, class_name)
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(get_adapter(family), model, n=1), latency=False)
    return res, res.save(root / "slim")


@needs_openvino
@pytest.mark.parametrize("family,class_name", ONE_PER_FAMILY, ids=[f for f, _ in ONE_PER_FAMILY])
def test_a_slim_model_exports_to_openvino_matches_pytorch_and_is_profiled(family, class_name, tmp_path):
    res, slim = _slim(family, class_name, tmp_path)
    out = tmp_path / "ov"
    r = CliRunner().invoke(app, ["export", str(slim), "--format", "openvino", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "OpenVINO IR graph(s)" in r.output and (out / ".upop-owned.json").is_file()
    meta = json.loads((out / "openvino.json").read_text())
    assert meta["format"] == "openvino" and meta["precision"] == "fp32"
    for g in meta["graphs"]:
        assert {p["batch"] for p in g["parity"]} == {1, 3} and all(p["max_abs"] <= FP32_TOL for p in g["parity"])
    # The recorded parity is not taken on trust: each IR runs fresh inputs beside the slim PyTorch model.
    from upop.exporters.runtimes.openvino import OvModel

    ov_model = OvModel(out)
    for graph in export_graphs(res.model.float().eval(), get_adapter(family)):
        torch.manual_seed(7)
        inputs = graph.make_inputs(2, 12)
        with torch.no_grad():
            ref = graph.module(*inputs.values())
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = ov_model.run(graph.name, **{k: v.numpy() for k, v in inputs.items()})
        for want, have in zip(ref, got):
            assert np.abs(want.float().numpy() - have).max() <= FP32_TOL, graph.name
    r = CliRunner().invoke(app, ["profile", str(out), "--runtime", "openvino", "--batch", "1", "--batch", "2",
                                 "--warmup", "1", "--runs", "2", "--json"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)["runs"]
    assert {(x["graph"], x["batch"]) for x in runs} == {(g["name"], b) for g in meta["graphs"] for b in (1, 2)}
    assert all(x["runtime"] == "openvino" and x["device"] == "cpu" and x["p50_ms"] > 0 for x in runs)


@needs_openvino
def test_openvino_evaluates_an_export_with_onnxruntimes_metric(tmp_path):
    from upop.exporters.evaluate import evaluate_artifact, open_artifact

    out = tmp_path / "ov"
    r = CliRunner().invoke(app, ["export", "demo-vit", "--format", "openvino", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    ov = evaluate_artifact(open_artifact(out, "openvino"), limit=16)
    ort = evaluate_artifact(open_artifact(out, "onnxruntime"), limit=16)  # the ONNX graphs beside the IR
    assert ov and ov.keys() == ort.keys() and all(abs(ov[k] - ort[k]) <= 1e-4 for k in ov)


@needs_openvino
def test_the_compress_report_measures_openvino_when_it_is_installed():
    from upop_cli.compress_cmd import _latency

    assert "openvino" in _latency(True, SimpleNamespace(device="cpu"))
    model = build_tiny("vit", "ViTForImageClassification")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    runtime = backend("openvino").report_runtime(torch.device("cpu"))
    report = upop.compress(model, cfg, batches=batches_for(get_adapter("vit"), model, n=2, batch_size=3),
                           latency={"openvino": runtime}).report
    rows = [r for r in report.latency if r["runtime"] == "openvino"]
    assert {r["batch"] for r in rows} == {1, 3} and all(r["before_ms"] > 0 and r["after_ms"] > 0 for r in rows)


def test_without_the_package_each_command_says_how_to_install_it(monkeypatch, tmp_path):
    ov = backend("openvino")
    monkeypatch.setattr(type(ov), "available", lambda self: False)
    for args in (["profile", "demo-vit", "--runtime", "openvino"],
                 ["export", "demo-vit", "--format", "openvino", "--out", str(tmp_path / "o")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and 'pip install "upop[openvino]"' in r.output, r.output
        assert "Traceback" not in r.output


def test_a_port_is_called_by_its_onnx_name():
    """The converter merges a graph input with the tensor of the node reading it; ``get_any_name`` then returns
    either, and a feed keyed by the other one left the input empty (an output of batch 0 at parity)."""
    from upop.exporters.runtimes.openvino import OvSession

    port = SimpleNamespace(get_names=lambda: {"/vision_model/embeddings/Cast_output_0", "pixel_values"})
    sess = OvSession.__new__(OvSession)
    sess.names = {"pixel_values", "image_embeds"}
    assert sess._name(port) == "pixel_values"
    sess.names = set()
    assert sess._name(port) == "pixel_values"


@needs_openvino
def test_timed_calls_of_one_graph_keep_their_own_feeds(tmp_path):
    """The benchmark times batch 1 and batch 8 of one graph in turns: each call runs its own inputs."""
    from upop.exporters.runtimes.openvino import OvSession

    model = build_tiny("vit", "ViTForImageClassification")
    graph = export_graphs(model, get_adapter("vit"))[0]
    path = tmp_path / "g.onnx"
    inputs = graph.make_inputs(1, 12)
    torch.onnx.export(graph.module, tuple(inputs.values()), str(path), input_names=list(inputs),
                      output_names=graph.outputs, dynamic_axes=graph.dynamic, dynamo=False)
    sess = OvSession(path, list(inputs))
    small, big = (graph.make_inputs(b, 12) for b in (1, 8))
    one = sess.call({k: v.numpy() for k, v in small.items()})
    eight = sess.call({k: v.numpy() for k, v in big.items()})
    assert next(iter(one().values())).shape[0] == 1 and next(iter(eight().values())).shape[0] == 8


@needs_openvino
def test_calibration_times_a_block_in_openvino():
    from upop.exporters.timing import block_timer

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x, kv):
            return self.lin(x) + kv.mean()

    timer = block_timer("openvino", torch.device("cpu"), "fp32")
    assert timer(Block(), {"x": torch.randn(2, 4, 16), "kv": torch.randn(2, 4, 16)}, 1, 3, None) > 0
