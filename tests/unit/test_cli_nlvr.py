"""The NLVR2 road through the CLI: convert the original checkpoint, compress, export, predict."""

from __future__ import annotations

import json

import torch
from PIL import Image
from typer.testing import CliRunner

from upop.datasets import shapes
from upop.models.demo import build_tokenizer
from upop.tasks import Preprocessor
from upop.adapters import get_adapter
from upop_cli.app import app

from .models.test_blip_nlvr import _original_layout, _same_width_model


def test_convert_compress_export_predict(tmp_path):
    runner = CliRunner()
    src = _same_width_model()
    ckpt = tmp_path / "model_base_nlvr.pth"
    torch.save({"model": _original_layout(src)}, ckpt)
    proc_dir = tmp_path / "proc"
    Preprocessor(build_tokenizer(), get_adapter("blip").image_processor(32)).save_pretrained(proc_dir)

    r = runner.invoke(app, ["convert", "nlvr", str(ckpt), "--out", str(tmp_path / "conv"), "--head-dim", "16"])
    assert r.exit_code == 2 and "outside the checkpoint's vocabulary" in r.output  # BLIP's [ENC] id, 30523
    r = runner.invoke(app, ["convert", "nlvr", str(ckpt), "--out", str(tmp_path / "conv"), "--head-dim", "16",
                            "--enc-token-id", "2", "--processor", str(proc_dir)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["model_type"] == "blip_nlvr"
    r = runner.invoke(app, ["convert", "nlvr", str(ckpt), "--out", str(tmp_path / "conv"), "--head-dim", "16"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["convert", "nlvr", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not exist" in r.output and not (tmp_path / "x").exists()

    data = shapes(tmp_path / "d", train=8, val=4, test=4, image_size=32, classification_per_class=(1, 1, 1))
    r = runner.invoke(app, ["compress", "--model", str(tmp_path / "conv"), "--ratio", "0.5", "--data", str(data),
                            "--batch-size", "4", "--search-epochs", "1", "--retrain-epochs", "1",
                            "--out", str(tmp_path / "slim"), "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "slim" / "report.json").read_text())
    assert report["task"] == "nlvr" and report["metrics"]["primary"] == "acc"
    roles = {(m["kind"], m["role"]) for m in report["modules"]}
    assert ("attn", "cross") in roles and report["params"]["after"]["total"] < report["params"]["before"]["total"]

    r = runner.invoke(app, ["export", str(tmp_path / "slim"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "reasoning" in r.output
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "b.png")
    r = runner.invoke(app, ["predict", str(tmp_path / "e"), "-i", str(tmp_path / "a.png"), "-i",
                            str(tmp_path / "b.png"), "-t", "both images contain a red circle"])
    assert r.exit_code == 0, r.output
    assert "p(true)" in r.output
    r = runner.invoke(app, ["predict", str(tmp_path / "e"), "-i", str(tmp_path / "a.png"), "-t", "x"])
    assert r.exit_code == 2 and "takes 2 --image" in r.output
