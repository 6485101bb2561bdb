"""The CLI's compress / eval / datasets commands and their errors, on tiny model folders."""

import json
import os
import subprocess
import sys

import pytest
import transformers
from typer.testing import CliRunner

from upop.datasets import shapes
from upop_cli.app import app

from ..conftest import build_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("cd") / "shapes", train=8, val=4, test=4, classification_per_class=(2, 1, 1))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny-vit"
    model = build_tiny("vit", "ViTForImageClassification")
    model.classifier = __import__("torch").nn.Linear(model.classifier.in_features, 12)
    model.config.num_labels = 12
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(path)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compress_writes_checkpoint_report_and_picture(vit_dir, data, tmp_path):
    out = tmp_path / "out"
    r = _invoke("compress", "--model", vit_dir, "--ratio", 0.5, "--data", data, "--out", out, "--batch-size", 8,
                "--search-epochs", 1, "--retrain-epochs", 1, "--quiet")
    assert r.exit_code == 0, r.output
    assert r.output == ""  # --quiet: nothing but errors
    for f in ("model.safetensors", "upop_manifest.json", "report.json", "report.md", "compression.png",
              "preprocessor_config.json", "upop_config.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["primary"] == "top1" and rep["task"] == "classification"
    assert {"before", "after"} <= set(rep["metrics"]) and rep["params"]["after"]["total"] < rep["params"]["before"]["total"]
    assert (out / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _invoke("inspect", out, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["family"] == "vit"
    r = _invoke("eval", out, "--data", data, "--json")
    assert r.exit_code == 0, r.output
    assert "top1" in json.loads(r.output)["metrics"]


def test_config_file_and_flags(vit_dir, data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{vit_dir}"\nratio = 0.3\ndata = "{data}"\nbatch_size = 8\nretrain_epochs = 0\n'
                   f'out = "{tmp_path / "from-file"}"\n')
    r = _invoke("compress", "--config", cfg, "--ratio", 0.6, "--quiet")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "from-file" / "report.json").read_text())
    assert rep["ratio"] == 0.6  # the flag wins over the file
    bad = tmp_path / "bad.toml"
    bad.write_text("speed = 3\n")
    r = _invoke("compress", "--config", bad)
    assert r.exit_code == 2 and "unknown option(s) speed" in r.output


ERRORS = [
    (["--model", "{vit}", "--ratio", "1.5"], "ratio must be strictly between 0 and 1"),
    (["--model", "{vit}", "--ratio", "0"], "ratio must be strictly between 0 and 1"),
    (["--model", "nobody-xyz/none", "--ratio", "0.5"], "demo-\\* model"),
    (["--model", "{tmp}/missing/model", "--ratio", "0.5"], "does not exist"),
    (["--model", "{bert}", "--ratio", "0.5"], "'bert' is not supported; supported model types: blip, blip_nlvr, clip, deit"),
    (["--model", "{vit}", "--ratio", "0.5", "--task", "caption", "--data", "{data}"], "cannot do task 'caption'"),
    (["--model", "{vit}", "--ratio", "0.5", "--data", "{tmp}/nodata"], "data folder .* does not exist"),
    (["--model", "{vit}", "--ratio", "0.5", "--data", "{tmp}"], "no train split for classification"),
    (["--model", "{vit}", "--ratio", "0.5"], "no data given"),
    (["--model", "{corrupt}", "--ratio", "0.5", "--data", "{data}"], "could not load the weights"),
    (["--model", "{vit}", "--ratio", "0.5", "--profile", "nosuch"], "unknown profile 'nosuch'"),
    (["--model", "{vit}", "--ratio", "0.5", "--granularity", "neuron"], "granularity must be one of dim, head"),
    (["--ratio", "0.5"], "--model is required"),
]


@pytest.mark.parametrize("args,match", ERRORS, ids=[m[:30] for _a, m in ERRORS])
def test_bad_input_is_one_clear_line(args, match, vit_dir, data, tmp_path, monkeypatch):
    import re
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(tmp_path / "bert")
    shutil.copytree(vit_dir, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage" * 8)
    args = [a.format(vit=vit_dir, data=data, tmp=tmp_path, bert=tmp_path / "bert", corrupt=tmp_path / "corrupt")
            for a in args]
    r = runner.invoke(app, ["compress", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1
    assert re.search(match, r.output), r.output
    assert not (tmp_path / "o").exists()


def test_existing_output_folder_is_left_untouched(vit_dir, data, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    for flags in ([], ["--overwrite"]):  # a folder upop did not write is never replaced
        r = _invoke("compress", "--model", vit_dir, "--ratio", 0.5, "--data", data, "--out", out, *flags)
        assert r.exit_code == 2 and "already exists and was not written by upop" in r.output
        assert r.output.count("\n") == 1
        assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_cuda_without_a_gpu(vit_dir, data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = _invoke("compress", "--model", vit_dir, "--ratio", 0.5, "--data", data, "--device", "cuda", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no CUDA GPU is available" in r.output


def test_datasets_shapes_command(tmp_path):
    r = _invoke("datasets", "shapes", "--out", tmp_path / "s", "--train", 4, "--val", 2, "--test", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "retrieval_train.json").is_file()
    r = _invoke("datasets", "shapes", "--out", tmp_path / "s")
    assert r.exit_code == 2 and "not empty" in r.output


def test_the_installed_console_script_turns_errors_into_one_line(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "upop")
    r = subprocess.run([exe, "compress", "--model", str(tmp_path / "nothing-here" / "m"), "--ratio", "0.5"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: model path") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_scale_options_reach_the_run(tmp_path, monkeypatch):
    """--grad-accum, --max-steps, --workers, --cache-gb and --no-latency are validated and handed to compress."""
    import upop
    from upop_cli.app import app as cli

    seen = {}

    def fake(model, cfg, **kw):
        seen.update(cfg=cfg, **kw)
        raise upop.ConfigError("stop here")

    monkeypatch.setattr(upop, "compress", fake)
    r = CliRunner().invoke(cli, ["compress", "--model", "demo-vit", "--ratio", "0.5", "--grad-accum", "4",
                                 "--max-steps", "3", "--workers", "2", "--cache-gb", "0.5", "--no-latency",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen["cfg"].search.grad_accum == seen["cfg"].retrain.grad_accum == 4
    assert seen["cfg"].search.max_steps == seen["cfg"].retrain.max_steps == 3
    assert seen["task_options"] == {"workers": 2, "cache_gb": 0.5, "augment": "none"} and seen["latency"] is False
    for bad, name in ((["--grad-accum", "0"], "--grad-accum"), (["--workers", "-1"], "--workers"),
                      (["--max-steps", "0"], "--max-steps"), (["--cache-gb", "-2"], "--cache-gb")):
        r = CliRunner().invoke(cli, ["compress", "--model", "demo-vit", "--ratio", "0.5", *bad,
                                     "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and name in r.output, r.output


def test_bool_options_reach_torchrun_workers_as_switches():
    from upop_cli.launch import worker_args

    assert worker_args("compress", {"latency": False, "ratio": 0.5, "workers": None}, {"quiet": True}) == \
        ["compress", "--no-latency", "--ratio", "0.5", "--quiet"]


def test_export_after_compress_puts_the_deployment_table_in_the_report(vit_dir, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the exports' default folders (upop-export/) land here
    out = tmp_path / "out"
    r = _invoke("compress", "--model", vit_dir, "--ratio", 0.5, "--data", data, "--out", out, "--batch-size", 8,
                "--search-epochs", 1, "--retrain-epochs", 1, "--export", "onnx", "--precision", "auto",
                "--calibration-size", 4, "--no-latency")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    dep = rep["deployment"]
    assert dep["runtime"] == "onnxruntime" and dep["export"] == os.path.join("upop-export", "out-onnxruntime")
    assert dep["original"] == os.path.join("upop-export", "tiny-vit-onnxruntime")
    rows = {row["precision"]: row for row in dep["deployment"]["rows"]}
    assert set(rows) == {"fp32", "fp16", "int8", "int8-dynamic"} and dep["precision"] in rows
    assert all(row["metric_val"] is not None and "speedup_vs_original" in row for row in rows.values())
    assert dep["choice"]["chosen"] == dep["precision"]
    assert (tmp_path / dep["export"] / "export.json").is_file() and (tmp_path / dep["original"] / "export.json").is_file()
    md = (out / "report.md").read_text()
    assert "## Deployment" in md and f"| {dep['precision']} (chosen) |" in md
    assert "deployment (onnxruntime cpu)" in r.output and f"auto chose {dep['precision']}" in r.output


@pytest.mark.parametrize("args,match", [
    (["--precision", "int8"], "--precision does not apply to this run (it is for --export, which is not given)"),
    (["--export", "onnxruntime", "--max-drop", "2"], "--max-drop does not apply to this run (only --precision int8"),
    (["--export", "onnxruntime", "--precision", "int4"], "--precision must be one of fp32, fp16, int8, int8-dynamic, auto"),
    (["--export", "torch"], "export format 'torch' is not supported"),
    (["--export", "tensorrt", "--precision", "int8-dynamic"], "--format tensorrt builds fp32, fp16 or int8 engines"),
])
def test_export_flags_are_checked_before_the_run(args, match, vit_dir, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _invoke("compress", "--model", vit_dir, "--ratio", 0.5, "--data", data, "--out", tmp_path / "out", *args)
    assert r.exit_code == 2 and match in r.output, r.output
    assert not (tmp_path / "out").exists()  # refused before any work


def test_an_export_folder_upop_did_not_write_stops_the_run_before_it_starts(vit_dir, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "upop-export" / "out-onnxruntime"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    r = _invoke("compress", "--model", vit_dir, "--ratio", 0.5, "--data", data, "--out", tmp_path / "out",
                "--export", "onnxruntime", "--overwrite")
    assert r.exit_code == 2 and "out-onnxruntime" in r.output, r.output
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()


def test_the_compress_table_offers_the_exporters_precisions():
    from upop.exporters.precision import CHOICES
    from upop.run.options import EXPORT_PRECISIONS

    assert EXPORT_PRECISIONS == CHOICES
