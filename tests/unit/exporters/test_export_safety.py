"""Exports replace only upop's own folders; export folders are read as untrusted; no folder's code runs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import upop
from upop_cli.app import app

from ...conftest import vit_export

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A slim tiny ViT with its image processor, and its ONNX export (FP32 only)."""
    return vit_export(tmp_path_factory.mktemp("exp"))


def _one_line(r, match):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert match in r.output, r.output


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_never_empties_a_users_folder(exported, tmp_path):
    slim, _, _ = exported
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "thesis.tex").write_text("years of work")
    _one_line(runner.invoke(app, ["export", str(slim), "--out", str(proj), "--overwrite"]), "not written by upop")
    assert (proj / "thesis.tex").read_text() == "years of work" and _listing(proj) == ["thesis.tex"]


def test_export_onto_its_own_source_is_refused(exported, tmp_path):
    slim, _, _ = exported
    src = shutil.copytree(slim, tmp_path / "selfexp")
    before = _listing(src)
    for out in (src, src / "onnx", tmp_path):
        _one_line(runner.invoke(app, ["export", str(src), "--out", str(out), "--overwrite"]), "the source")
    assert _listing(src) == before and upop.load(src) is not None


def test_an_earlier_export_is_replaced_with_overwrite(exported, tmp_path):
    slim, onnx, _ = exported
    out = shutil.copytree(onnx, tmp_path / "again")
    _one_line(runner.invoke(app, ["export", str(slim), "--out", str(out)]), "already exists; pass --overwrite")
    r = runner.invoke(app, ["export", str(slim), "--out", str(out), "--overwrite", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "export.json").read_text())["graphs"]


def test_predict_fp16_without_fp16_graphs(exported):
    _, onnx, image = exported
    _one_line(runner.invoke(app, ["predict", str(onnx), "-i", str(image), "--fp16"]),
              "has no FP16 graphs: export it with --fp16, or run without --fp16")
    r = runner.invoke(app, ["predict", str(onnx), "-i", str(image)])
    assert r.exit_code == 0, r.output


def _damage(onnx, tmp_path, how):
    d = shutil.copytree(onnx, tmp_path / "d")
    manifest = json.loads((d / "export.json").read_text())
    if how == "not_json":
        (d / "export.json").write_text('{"graphs": [')
    elif how == "graphs_not_list":
        manifest["graphs"] = {"a": 1}
    elif how == "file_escapes":
        manifest["graphs"][0]["file"] = "../../classifier.onnx"
    elif how == "file_absolute":
        manifest["graphs"][0]["file"] = "/etc/passwd"
    elif how == "fp16_escapes":
        manifest["graphs"][0]["fp16"] = {"file": "../x.onnx"}
    elif how == "tokens_list":
        manifest["tokens"] = [1]
    elif how == "onnx_garbage":
        (d / manifest["graphs"][0]["file"]).write_bytes(b"\x00not a graph" * 100)
    elif how == "onnx_truncated":
        path = d / manifest["graphs"][0]["file"]
        path.write_bytes(path.read_bytes()[:200])
    elif how == "onnx_missing":
        (d / manifest["graphs"][0]["file"]).unlink()
    if how not in ("not_json", "onnx_garbage", "onnx_truncated", "onnx_missing"):
        (d / "export.json").write_text(json.dumps(manifest))
    return d


DAMAGE = {
    "not_json": "is damaged (not valid JSON",
    "graphs_not_list": "is damaged (no task or no list of graphs)",
    "file_escapes": "leaves its folder",
    "file_absolute": "leaves its folder",
    "fp16_escapes": "leaves its folder",
    "tokens_list": "tokens must be an object",
    "onnx_garbage": "cannot be loaded (damaged or not an ONNX graph)",
    "onnx_truncated": "cannot be loaded (damaged or not an ONNX graph)",
    "onnx_missing": "cannot be loaded (damaged or not an ONNX graph)",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_export_folder_is_one_line(exported, tmp_path, how):
    _, onnx, image = exported
    d = _damage(onnx, tmp_path, how)
    _one_line(runner.invoke(app, ["predict", str(d), "-i", str(image)]), DAMAGE[how])


EVIL = """
from pathlib import Path
Path({sentinel!r}).write_text("ran")
from transformers import ViTImageProcessorPil

class EvilProcessor(ViTImageProcessorPil):
    pass
"""


def _plant(folder, sentinel):
    """A preprocessor config whose auto_map points at a Python file in the folder (and no local class)."""
    (folder / "evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg.pop("image_processor_type", None)
    cfg["auto_map"] = {"AutoImageProcessor": "evil.EvilProcessor", "AutoProcessor": "evil.EvilProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))


def test_a_folders_code_never_runs_even_answering_yes(exported, tmp_path):
    _, onnx, image = exported
    d = shutil.copytree(onnx, tmp_path / "evil-export")
    sentinel = tmp_path / "SENTINEL"
    _plant(d, sentinel)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-m", "upop_cli.app", "predict", str(d), "-i", str(image)],
                       input="y\n" * 100, capture_output=True, text=True, env=env, timeout=300)
    assert not sentinel.exists(), r.stdout + r.stderr
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Do you wish to run the custom code" not in r.stdout + r.stderr


def test_hub_never_runs_a_folders_code_when_asked_on_stdin(exported, tmp_path, monkeypatch):
    """The library itself, without the CLI's guard: load_processor passes trust_remote_code=False."""
    import builtins

    from upop.models.hub import load_processor

    slim, _, _ = exported
    d = shutil.copytree(slim, tmp_path / "evil-slim")
    sentinel = tmp_path / "SENTINEL"
    _plant(d, sentinel)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(builtins, "input", lambda *a: "y")
    load_processor(str(d))
    assert not sentinel.exists()
