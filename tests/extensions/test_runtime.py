"""A runtime in one file: this test defines one (ONNX's reference evaluator, a pure-numpy interpreter of ONNX
graphs), registers it and runs compress → export → profile → eval with it, editing no other file.

What a runtime needs is a ``Backend`` subclass registered with ``upop.exporters.registry.register``; placed in
``exporters/runtimes/`` it registers itself on import (see docs/extending.md, "A runtime")."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import upop
from upop.adapters import get_adapter
from upop.exporters import backend, backends
from upop.exporters.registry import Backend, register, unregister
from upop.exporters.runtime import GraphModel, read_export_manifest
from upop_cli.app import app

from ..conftest import batches_for, build_tiny

MARKER = "reference.json"


class RefSession:
    """One ONNX graph in the reference evaluator, called like an ONNX Runtime session."""

    def __init__(self, path: str | Path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(path))
        self.inputs = [i.name for i in proto.graph.input]
        self.evaluator = ReferenceEvaluator(proto)

    def get_inputs(self):
        return [type("Port", (), {"name": n})() for n in self.inputs]

    def run(self, names, feed):
        return self.evaluator.run(None, {k: feed[k] for k in self.inputs})


class RefModel(GraphModel):
    def __init__(self, folder: Path):
        self.dir = folder / "onnx"
        self.manifest = read_export_manifest(self.dir)
        self.sessions = {g["name"]: RefSession(self.dir / g["file"]) for g in self.manifest["graphs"]}

    def input_names(self, graph):
        return self.sessions[graph].inputs

    def output_names(self, graph):
        return [o["name"] for g in self.manifest["graphs"] if g["name"] == graph for o in g["outputs"]]

    def providers_used(self):
        return {k: ["onnx.reference"] for k in self.sessions}

    def run(self, graph, **inputs):
        return self.sessions[graph].run(None, inputs)


class Reference(Backend):
    name, aliases, title = "reference", ("ref",), "ONNX reference evaluator"
    package, exports, devices, in_report = "onnx", True, ("cpu",), True

    def export(self, source, out_dir, *, opset=17, overwrite=False, progress=None, **_):
        from upop.run.checkpoint import atomic_dir
        from upop.exporters.onnx import export_onnx
        from upop.run.safety import check_replace

        check_replace(Path(out_dir), overwrite=overwrite, sources=[source])
        with atomic_dir(Path(out_dir)) as tmp:
            manifest = export_onnx(source, tmp / "onnx", opset=opset, progress=progress)
            meta = {"format": self.name, "graphs": [g["name"] for g in manifest["graphs"]]}
            (tmp / MARKER).write_text(json.dumps(meta))
        return meta

    def profile(self, target, batches, device, precision, warmup, runs):
        from upop.exporters.sessions import synthetic_feed
        from upop.latency.timing import make_run, time_fn

        model = RefModel(Path(target))
        rows = []
        for g in model.manifest["graphs"]:
            sess = model.sessions[g["name"]]
            for b in batches:
                feed = synthetic_feed(g, sess, b)
                rows.append(make_run(target, self.name, "cpu", precision, g["name"], b,
                                     time_fn(lambda: sess.run(None, feed), warmup, runs, cuda=False)))
        return rows

    def report_runtime(self, device):
        from upop.exporters.static_onnx import export_static_onnx
        from upop.latency.measure import Runtime

        def prepare(model, inputs):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "m.onnx")
                cpu = export_static_onnx(model, inputs, path, lambda out: out if torch.is_tensor(out) else out[0])
                sess = RefSession(path)
            feed = {k: cpu[k].numpy() for k in sess.inputs}
            return lambda: sess.run(None, feed)

        return Runtime(prepare)

    def owns(self, folder):
        return (folder / MARKER).is_file()

    def open_graphs(self, folder, device):
        model = RefModel(folder)
        return model, model.dir, None


@pytest.fixture
def reference():
    backends()  # the shipped runtimes first, as any command loads them
    register(Reference())
    yield backend("reference")
    unregister("reference")


def test_a_runtime_defined_here_compresses_exports_profiles_and_evaluates(reference, tmp_path):
    # compress: the report measures the new runtime beside PyTorch (what the CLI's compress asks every runtime)
    from upop_cli.compress_cmd import _latency

    model = build_tiny("vit", "ViTForImageClassification")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0), device="cpu")
    latency = _latency(True, cfg)
    assert "reference" in latency
    res = upop.compress(model, cfg, batches=batches_for(get_adapter("vit"), model, n=2, batch_size=3),
                        latency={"reference": latency["reference"]})
    rows = [r for r in res.report.latency if r["runtime"] == "reference"]
    assert {r["batch"] for r in rows} == {1, 3} and all(r["after_ms"] > 0 for r in rows)
    slim = res.save(tmp_path / "slim")

    # export: by its name and by its older spelling, the folder owned by upop
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(slim), "--format", "ref", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert f"export (ONNX reference evaluator): {tmp_path / 'e'}" in r.output
    assert json.loads((tmp_path / "e" / MARKER).read_text())["graphs"] == ["classifier"]

    # profile: the rows carry the runtime's one name
    r = runner.invoke(app, ["profile", str(tmp_path / "e"), "--runtime", "reference", "--batch", "1", "--batch", "2",
                            "--warmup", "0", "--runs", "2", "--json"])
    assert r.exit_code == 0, r.output
    runs = json.loads(r.stdout)["runs"]
    assert {(x["runtime"], x["graph"], x["batch"]) for x in runs} == {("reference", "classifier", b) for b in (1, 2)}

    # eval's graphs: the reference evaluator gives PyTorch's logits
    from upop.exporters.graphs import export_graphs

    graphs, _, _ = reference.open_graphs(tmp_path / "e", "cpu")
    graph = export_graphs(res.model.float().eval(), get_adapter("vit"))[0]
    inputs = graph.make_inputs(2, 12)
    with torch.no_grad():
        want = graph.module(*inputs.values())
    got = graphs.run(graph.name, **{k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(want.numpy() - got).max() <= 1e-4


def test_an_unregistered_runtime_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["profile", "demo-vit", "--runtime", "reference"])
    assert r.exit_code == 2 and "'reference' is not a runtime upop knows" in r.output
