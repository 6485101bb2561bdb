import json

import pytest
import transformers
from typer.testing import CliRunner

import upop
from upop.latency.timing import Timing, percentile, speedup
from upop_cli.app import app

from ..conftest import batches_for, build_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prof")
    model = build_tiny("vit", "ViTForImageClassification")
    model.save_pretrained(root / "orig")
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "orig")
    adapter = upop.adapters.get_adapter("vit")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=1))
    return root / "orig", res.save(root / "slim")


def test_percentiles_and_speedup():
    assert percentile([1, 2, 3, 4], 0.5) == 2.5 and percentile([5], 0.99) == 5
    mk = lambda b, ms: Timing("t", "torch", "cpu", "fp32", "g", b, ms, ms, ms, 1.0)  # noqa: E731
    # baseline 4 ms and 9 ms, candidate 2 and 3: ratios 2 and 3, geometric mean sqrt(6)
    assert speedup([mk(1, 4.0), mk(8, 9.0)], [mk(1, 2.0), mk(8, 3.0)]) == pytest.approx(6 ** 0.5)


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_profile_writes_runs_and_speedup(folders, runtime, tmp_path):
    orig, slim = folders
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", str(slim), "--runtime", runtime, "--batch", "1", "--batch", "2", "--runs", "3",
                            "--warmup", "1", "--compare", str(orig), "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 4 and data["speedup"] > 0
    assert {x["batch"] for x in data["runs"]} == {1, 2}
    assert all(x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"] for x in data["runs"])
    if runtime == "ort":
        assert all(x["provider"] == "CPUExecutionProvider" for x in data["runs"])


def test_profile_errors(folders):
    orig, slim = folders
    r = runner.invoke(app, ["profile", str(slim), "--runtime", "trt"])
    assert r.exit_code == 2 and ("TensorRT" in r.output or "NVIDIA" in r.output)
    r = runner.invoke(app, ["profile", str(slim), "--precision", "fp16"])
    assert r.exit_code == 2 and "fp16 latency needs a CUDA device" in r.output
