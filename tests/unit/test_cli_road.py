"""The road as users type it: compress, then export / profile with no path; output for logs and scripts
(summary off a terminal, --json, --quiet, no source locations); no network for demos and local folders."""

import json
import re
import socket

import pytest
import transformers
from typer.testing import CliRunner

from upop_cli.app import app

from ..conftest import build_tiny

try:  # click < 8.2 mixes stderr into output unless told not to; 8.2+ keeps both apart by default
    runner = CliRunner(mix_stderr=False)
except TypeError:
    runner = CliRunner()

SOURCE_LOCATION = re.compile(r"\b\w+\.py:\d+")


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny ViT folder and a tiny shapes set (what a user has: a model and a data folder)."""
    from upop.datasets import shapes

    root = tmp_path_factory.mktemp("road")
    shapes(root / "data", train=8, val=4, test=4, classification_per_class=(2, 1, 1))
    model = build_tiny("vit", "ViTForImageClassification")
    model.classifier = __import__("torch").nn.Linear(model.classifier.in_features, 12)
    model.config.num_labels = 12
    model.config.architectures = ["ViTForImageClassification"]
    model.save_pretrained(root / "tiny-vit")
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "tiny-vit")
    return root


def _compress(root, *extra):
    out = root / "upop-out" / "tiny-vit-p0.5"
    return out, _invoke("compress", "--model", root / "tiny-vit", "--ratio", 0.5, "--data", root / "data", "--out", out,
                        "--batch-size", 8, "--search-epochs", 1, "--retrain-epochs", 1, "--overwrite", *extra)


@pytest.fixture(scope="module")
def compressed(root):
    """``upop compress --json``: the run the other tests continue from."""
    out, r = _compress(root, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    return out, r


def test_compress_json_is_the_report_alone_on_stdout(compressed):
    out, r = compressed
    data = json.loads(r.stdout)  # nothing but the JSON on stdout
    assert data["out"] == str(out.resolve())
    assert data["task"] == "classification" and {"before", "after"} <= set(data["metrics"])
    assert data["params"]["after"]["total"] < data["params"]["before"]["total"]
    assert "latency" in data
    # the summary and the output paths still reach the person reading the log, on stderr
    assert "after/before" in r.stderr and f"report: {out / 'report.md'}" in r.stderr
    assert not SOURCE_LOCATION.search(r.stdout + r.stderr)


def test_compress_records_the_latest_output_atomically(compressed):
    out, _r = compressed
    record = json.loads((out.parent / "latest.json").read_text())
    assert record["path"] == str(out.resolve()) and record["model"].endswith("tiny-vit") and record["written"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".latest")] == []  # no temp file left


def test_summary_and_paths_print_when_stdout_is_a_pipe(root, compressed):
    out, r = _compress(root)  # CliRunner's stdout is not a terminal, like `| tee log` or a batch job
    assert r.exit_code == 0, r.output + r.stderr
    assert "after/before" in r.stdout and "top1" in r.stdout
    assert f"slim checkpoint: {out}" in r.stdout and f"report: {out / 'report.md'}" in r.stdout
    assert "\x1b[" not in r.stdout  # plain text: no colour codes, no redraws
    assert "eta" not in r.stderr and "\r" not in r.stdout + r.stderr  # no progress bar or spinner
    assert not any(ch in r.stdout + r.stderr for ch in "⠋⠙⠹⠸")
    assert not SOURCE_LOCATION.search(r.stdout + r.stderr)


def test_quiet_prints_nothing_but_json_is_still_the_report(root, compressed):
    out, r = _compress(root, "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    _out, r = _compress(root, "--quiet", "--json")
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)["out"] == str(out.resolve())


def test_progress_bars_only_for_a_person_at_a_terminal(monkeypatch):
    import sys

    from upop_cli.progress import interactive

    for out_tty, err_tty, as_json, quiet, want in [(True, True, False, False, True), (False, True, False, False, False),
                                                   (True, False, False, False, False), (False, True, True, False, True),
                                                   (True, True, False, True, False)]:
        monkeypatch.setattr(sys.stdout, "isatty", lambda v=out_tty: v, raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda v=err_tty: v, raising=False)
        assert interactive(quiet, as_json) is want, (out_tty, err_tty, as_json, quiet)


def test_profile_without_a_path_takes_the_last_compress(root, compressed, monkeypatch):
    out, _r = compressed
    monkeypatch.chdir(root)  # ./upop-out/latest.json
    r = _invoke("profile", "--batch", 1, "--runs", 2, "--warmup", 0, "--json")
    assert r.exit_code == 0, r.output + r.stderr
    assert "using the last compress output: upop-out/tiny-vit-p0.5\n" in r.stderr  # relative to here
    data = json.loads(r.stdout)
    assert data["runs"] and {x["target"] for x in data["runs"]} == {"upop-out/tiny-vit-p0.5"}
    assert "p50 ms" in r.stderr  # the table, on stderr under --json
    assert not SOURCE_LOCATION.search(r.stdout + r.stderr)


def test_export_without_a_path_takes_the_last_compress(root, compressed, monkeypatch, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out, _r = compressed
    monkeypatch.chdir(root)
    r = _invoke("export", "--out", tmp_path / "onnx", "--json")
    assert r.exit_code == 0, r.output + r.stderr
    assert "using the last compress output: upop-out/tiny-vit-p0.5\n" in r.stderr
    data = json.loads(r.stdout)
    assert data["out"] == str((tmp_path / "onnx").resolve()) and data["graphs"]
    assert data == {**json.loads((tmp_path / "onnx" / "export.json").read_text()), "out": data["out"]}
    assert not SOURCE_LOCATION.search(r.stdout + r.stderr)
    r = _invoke("export", "--out", tmp_path / "onnx2")  # progress lines and the table, no file:line on the right
    assert r.exit_code == 0, r.output + r.stderr
    assert "max abs" in r.stdout and f"export: {tmp_path / 'onnx2'}" in r.stdout
    assert not SOURCE_LOCATION.search(r.stdout + r.stderr)


def test_export_trt_right_after_compress_says_what_is_missing(root, compressed, monkeypatch, tmp_path):
    import torch

    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are here: the export would run")
    except ImportError:
        pass
    monkeypatch.chdir(root)
    r = _invoke("export", "--format", "trt", "--out", tmp_path / "trt")
    assert r.exit_code == 2, r.output + r.stderr
    assert "Missing argument" not in r.stderr
    assert r.stderr.count("\n") <= 2 and re.search(r"error: TensorRT (is not installed|engines are built on an NVIDIA GPU)",
                                                   r.stderr), r.stderr


@pytest.mark.parametrize("command", ["export", "profile"])
def test_no_path_and_no_earlier_compress_is_one_line(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _invoke(command)
    assert r.exit_code == 2, r.output + r.stderr
    assert r.stderr.startswith("error: no path given and no earlier `upop compress` output in upop-out/")
    assert f"upop {command} upop-out/" in r.stderr and r.stderr.count("\n") == 1
    (tmp_path / "upop-out").mkdir()
    (tmp_path / "upop-out" / "latest.json").write_text(json.dumps({"path": str(tmp_path / "gone")}))
    r = _invoke(command)
    assert r.exit_code == 2 and "no longer exists" in r.stderr and r.stderr.count("\n") == 1


@pytest.fixture
def no_network(monkeypatch):
    """The network unreachable, and every way to it recorded: a socket connection, or a call into the hub client."""
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.file_download

    from upop.models import hub

    attempts = []

    def refuse(what):
        def f(*a, **k):
            attempts.append(what)
            raise OSError(f"network unreachable ({what})")
        return f

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_PROBED", {})
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    for mod in (huggingface_hub, huggingface_hub.file_download):
        for name in ("hf_hub_download", "get_hf_file_metadata", "model_info", "snapshot_download"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse(name))
    return attempts


@pytest.mark.parametrize("runtime", ["torch", "ort"])
def test_profile_compare_demo_offline_makes_no_request(compressed, no_network, runtime):
    """``--runtime ort`` exports the demo first; the exporter asked the hub for ``demo-blip``'s files by
    name (five HEAD requests with back-off per file) before this rule."""
    if runtime == "ort":
        pytest.importorskip("onnxruntime")
    out, _r = compressed
    r = _invoke("profile", out, "--compare", "demo-blip", "--runtime", runtime, "--batch", 1, "--runs", 2,
                "--warmup", 0)
    assert r.exit_code == 0, r.output + r.stderr
    assert no_network == []  # no probe, no hub call: a demo and a local folder never touch the network
    assert "speedup of" in r.stdout


def test_a_hub_id_offline_probes_once_and_fails_at_once(no_network):
    import time

    t0 = time.perf_counter()
    r = _invoke("profile", "nobody-xyz/none", "--batch", 1, "--runs", 1)
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert no_network == ["socket.create_connection"]  # the one probe; then the local cache only
    assert time.perf_counter() - t0 < 30


def test_network_rule():
    from upop.models.hub import needs_hub

    assert not needs_hub("demo-blip") and not needs_hub("./somewhere/model") and not needs_hub(None)
    assert needs_hub("Salesforce/blip-itm-base-coco") and needs_hub("openai/clip-vit-base-patch16")


def test_a_log_gets_plain_progress_lines_at_most_every_interval_and_at_the_end(capsys):
    from upop_cli.progress import Reporter

    rep = Reporter(False, lines=True, every_s=3600)
    rec = {"task_loss": 1.0, "loss": 1.2, "pi": 0.1, "images_per_s": 250.0, "data_wait": 0.02, "step_s": 0.1}
    for step in range(1, 11):
        rep("search", {**rec, "step": float(step), "total": 10.0})
    err = capsys.readouterr().err.splitlines()
    assert err == ["search 10/10  loss 1.000  π 0.100  250.0 img/s  data wait 2%"]
    rep = Reporter(False, lines=True, every_s=0)
    rep("retrain", {"loss": 0.5, "lr": 1e-5, "images_per_s": 10.0, "data_wait": 0.5, "step": 1.0, "total": 4.0})
    line = capsys.readouterr().err.strip()
    assert line.startswith("retrain 1/4  loss 0.500  lr 1.00e-05  10.0 img/s  data wait 50%") and "eta" in line
    assert Reporter(True, lines=True).lines is False  # bars on a terminal, not both


def test_the_record_is_never_written_into_a_folder_of_the_users(tmp_path):
    from upop_cli.latest import write_latest

    (tmp_path / "proj" / "r").mkdir(parents=True)
    assert write_latest(tmp_path / "proj" / "r", "m") is None and not (tmp_path / "proj" / "latest.json").exists()
    mine = tmp_path / "upop-out"
    (mine / "r").mkdir(parents=True)
    (mine / "latest.json").write_text("my own notes")  # not a record upop wrote: left as it is
    assert write_latest(mine / "r", "m") is None and (mine / "latest.json").read_text() == "my own notes"
    (mine / "latest.json").unlink()
    assert write_latest(mine / "r", "m") == mine / "latest.json"
