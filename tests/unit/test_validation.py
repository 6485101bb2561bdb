"""Every bad value of every command is one line naming the option, exit 2, before anything runs."""

import pytest
from typer.testing import CliRunner

import upop
import upop.exporters.timing
from upop_cli.app import app

from ..conftest import vit_export, vit_run_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return vit_run_folder(tmp_path_factory.mktemp("validation"))


@pytest.fixture
def no_run(monkeypatch):
    calls = []
    monkeypatch.setattr(upop, "compress", lambda *a, **k: calls.append(k))
    return calls


def _one_line(r, match):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert match in r.output, r.output


COMPRESS_FLAGS = [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "-3"], "--batch-size must be an integer >= 1, got -3"),
    (["--eval-limit", "-1"], "--eval-limit must be an integer >= 1, got -1"),
    (["--search-epochs", "0"], "--search-epochs must be an integer >= 1, got 0"),
    (["--retrain-epochs", "-1"], "--retrain-epochs must be an integer >= 0, got -1"),
    (["--lr", "-1e-3"], "--lr must be a number >= 0, got -0.001"),
    (["--lr", "nan"], "--lr must be a number >= 0, got nan"),
    (["--update-every", "0"], "--update-every must be an integer >= 1, got 0"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be an integer >= 0, got -5"),
    (["--seed", "-1"], "--seed must be an integer in 0..4294967295, got -1"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer in 0..4294967295, got 99999999999999999999999"),
    (["--batch-size", "100000000000"], "--batch-size must be at most 2147483647, got 100000000000"),
    (["--search-epochs", str(2**63)], f"--search-epochs must be at most 2147483647, got {2**63}"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--target-latency", "-2", "--profile", "t4"], "--target-latency must be a number of milliseconds > 0"),
    (["--towers", "vision;text"], "--towers must be tower names separated by commas (e.g. vision,language), got "
                                  "'vision;text'"),
    (["--drop-path", "1.5"], "--drop-path must be a number in [0, 1), got 1.5"),
]


@pytest.mark.parametrize("flags,match", COMPRESS_FLAGS, ids=[f[0] + f[1] for f, _m in COMPRESS_FLAGS])
def test_compress_flags_out_of_range(run_folder, tmp_path, no_run, flags, match):
    model, data = run_folder
    r = runner.invoke(app, ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data),
                            "--out", str(tmp_path / "o"), *flags])
    _one_line(r, match)
    assert no_run == [] and not (tmp_path / "o").exists()


TOML = [
    ('batch_size = "big"', "batch_size must be an integer >= 1, got 'big'"),
    ('seed = "abc"', "seed must be an integer in 0..4294967295, got 'abc'"),
    ("seed = 9223372036854775807", "seed must be an integer in 0..4294967295, got 9223372036854775807"),
    ("batch_size = 9223372036854775807", "batch_size must be at most 2147483647, got 9223372036854775807"),
    ("out = 5", "out must be a folder, got 5"),
    ("ratio = true", "ratio must be strictly between 0 and 1, got True"),
    ("search_epochs = 1.5", "search_epochs must be an integer >= 1, got 1.5"),
    ("lr = [1]", "lr must be a number >= 0, got [1]"),
    ('granularity = "neuron"', "granularity must be one of dim, head, got 'neuron'"),
    ("compress = 3", "[compress] must be a table of options"),
]


@pytest.mark.parametrize("line,match", TOML, ids=[t[0] for t in TOML])
def test_toml_values_of_the_wrong_type(run_folder, tmp_path, no_run, line, match):
    model, data = run_folder
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{model}"\ndata = "{data}"\n{line}\n')
    r = runner.invoke(app, ["compress", "--config", str(cfg), "--ratio", "0.5", "--out", str(tmp_path / "o")])
    _one_line(r, match)
    assert str(cfg) in r.output and no_run == []


def test_eval_batch_size_and_limit(run_folder, monkeypatch):
    from upop.tasks.base import ImageStore

    model, data = run_folder
    _one_line(runner.invoke(app, ["eval", str(model), "--data", str(data), "--batch-size", "0"]),
              "--batch-size must be an integer >= 1, got 0")
    _one_line(runner.invoke(app, ["eval", str(model), "--data", str(data), "--limit", "-1"]),
              "--limit must be an integer >= 1, got -1")
    sizes = []
    real = ImageStore.stream

    def spy(self, groups, device):
        sizes.extend(len(g) for g in groups)
        return real(self, groups, device)

    monkeypatch.setattr(ImageStore, "stream", spy)
    r = runner.invoke(app, ["eval", str(model), "--data", str(data), "--batch-size", "5", "--json"])
    assert r.exit_code == 0, r.output
    assert sizes == [5, 5, 2]  # the 12 test images in batches of --batch-size


@pytest.mark.parametrize("opset", ["0", "13", "99"])
def test_export_opset_outside_the_exporters_range(run_folder, tmp_path, opset):
    model, _ = run_folder
    r = runner.invoke(app, ["export", str(model), "--out", str(tmp_path / "e"), "--opset", opset])
    _one_line(r, f"--opset must be between 14 and 20 (the exporter's range), got {opset}")
    assert not (tmp_path / "e").exists()


UNKNOWN_RUNTIME = ("--runtime 'foo' is not a runtime upop knows; known: onnxruntime (or ort, onnx), openvino, "
                   "tensorrt (or trt), torch")
PROFILE = [
    (["--runs", "0"], "--runs must be an integer >= 1, got 0"),
    (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["--batch", "1", "--batch", "-4"], "--batch must be an integer >= 1, got -4"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--runtime", "foo"], UNKNOWN_RUNTIME),
    (["--precision", "int4"], "--precision must be fp32 or fp16, got 'int4'"),
    (["--device", "tpu"], "--device must be cpu or cuda, got 'tpu'"),
]


@pytest.mark.parametrize("flags,match", PROFILE, ids=[" ".join(f) for f, _m in PROFILE])
def test_profile_options(run_folder, flags, match, monkeypatch):
    import upop.latency.timing

    monkeypatch.setattr(upop.exporters.timing, "profile_torch", lambda *a, **k: pytest.fail("profiled a bad request"))
    model, _ = run_folder
    _one_line(runner.invoke(app, ["profile", str(model), *flags]), match)


def test_convert_head_dim(tmp_path):
    import torch

    from upop.models.convert import ORIGINAL_ENC_TOKEN_ID  # noqa: F401  (the module the CLI reads with)

    ckpt = tmp_path / "nlvr.pth"
    torch.save({"visual_encoder.pos_embed": torch.zeros(1, 5, 48),
                "text_encoder.embeddings.word_embeddings.weight": torch.zeros(10, 48)}, ckpt)
    _one_line(runner.invoke(app, ["convert", "nlvr", str(ckpt), "--out", str(tmp_path / "o"), "--head-dim", "0"]),
              "--head-dim must be an integer >= 1, got 0")
    _one_line(runner.invoke(app, ["convert", "nlvr", str(ckpt), "--out", str(tmp_path / "o"), "--head-dim", "-8"]),
              "--head-dim must be an integer >= 1, got -8")
    _one_line(runner.invoke(app, ["convert", "nlvr", str(ckpt), "--out", str(tmp_path / "o"), "--head-dim", "20"]),
              "--head-dim 20 does not divide the vision width 48")
    assert not (tmp_path / "o").exists()


def test_convert_never_replaces_a_foreign_folder(tmp_path):
    import torch

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    torch.save({"x": torch.zeros(1)}, tmp_path / "c.pth")
    r = runner.invoke(app, ["convert", "nlvr", str(tmp_path / "c.pth"), "--out", str(tmp_path / "o"), "--overwrite"])
    _one_line(r, "not written by upop")
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"


SHAPES = [
    (["--train", "0"], "--train must be an integer in 1..1000000, got 0"),
    (["--val", "-2"], "--val must be an integer in 1..1000000, got -2"),
    (["--test", "0"], "--test must be an integer in 1..1000000, got 0"),
    (["--image-size", "0"], "--image-size must be an integer in 16..4096 (pixels), got 0"),
    (["--seed", "-1"], "--seed must be an integer in 0..4294967295, got -1"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer in 0..4294967295"),
    (["--image-size", "60000"], "--image-size must be an integer in 16..4096 (pixels), got 60000"),
    (["--train", str(2**40)], "--train must be an integer in 1..1000000"),
]


@pytest.mark.parametrize("flags,match", SHAPES, ids=[" ".join(f) for f, _m in SHAPES])
def test_datasets_shapes_sizes(tmp_path, flags, match):
    _one_line(runner.invoke(app, ["datasets", "shapes", "--out", str(tmp_path / "s"), *flags]), match)
    assert not (tmp_path / "s").exists()


def test_datasets_shapes_into_a_file(tmp_path):
    (tmp_path / "f").write_text("mine")
    _one_line(runner.invoke(app, ["datasets", "shapes", "--out", str(tmp_path / "f")]), "is a file")
    assert (tmp_path / "f").read_text() == "mine"


def test_calibrate_never_replaces_an_existing_file_without_overwrite(tmp_path, monkeypatch):
    import upop.latency.calibrate

    (tmp_path / "my.toml").write_text("mine")
    monkeypatch.setattr(upop.latency.calibrate, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    for extra in ([], ["--overwrite"]):  # a file upop did not write is never replaced
        r = runner.invoke(app, ["profiles", "calibrate", "--model", "demo-vit", "--out", str(tmp_path / "my.toml"),
                                *extra])
        _one_line(r, "my.toml exists and is not a hardware profile written by upop")
    assert (tmp_path / "my.toml").read_text() == "mine"
    from upop.latency.calibrate import to_toml
    from upop.profiles import load

    import dataclasses

    table = {"blocks": [], "rest_ms": 1.0, "granularity": "dim", "device": "cpu"}
    own = dataclasses.replace(load("cpu-x86"), latency_model="table", table=table)
    (tmp_path / "own.toml").write_text(to_toml(own))
    r = runner.invoke(app, ["profiles", "calibrate", "--model", "demo-vit", "--out", str(tmp_path / "own.toml")])
    _one_line(r, "already exists; pass --overwrite to replace it")
    r = runner.invoke(app, ["profiles", "calibrate", "--model", "demo-vit", "--out", str(tmp_path)])
    _one_line(r, "is a folder")
    r = runner.invoke(app, ["profiles", "calibrate", "--model", "demo-vit", "--out", str(tmp_path / "n.toml"),
                            "--runtime", "foo"])
    _one_line(r, UNKNOWN_RUNTIME)


# -- round two: one line for every case that was a traceback -------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A slim tiny ViT with its image processor, and its ONNX export."""
    return vit_export(tmp_path_factory.mktemp("exp"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _deep_latest(t, run_folder, exported, monkeypatch):
    monkeypatch.chdir(t)
    (t / "upop-out").mkdir()
    (t / "upop-out" / "latest.json").write_text(DEEP)
    return ["export"]


def _deep_manifest(t, run_folder, exported, monkeypatch):
    slim = _copy(exported[0], t / "s")
    (slim / "upop_manifest.json").write_text(DEEP)
    return ["inspect", str(slim)]


def _deep_config(t, run_folder, exported, monkeypatch):
    model = _copy(run_folder[0], t / "m")
    (model / "config.json").write_text(DEEP)
    return ["eval", str(model), "--data", str(run_folder[1])]


def _deep_export(t, run_folder, exported, monkeypatch):
    onnx = _copy(exported[1], t / "e")
    (onnx / "export.json").write_text(DEEP)
    return ["predict", str(onnx), "-i", str(exported[2])]


def _deep_export_profile(t, run_folder, exported, monkeypatch):
    onnx = _copy(exported[1], t / "e")
    (onnx / "export.json").write_text(DEEP)
    return ["profile", str(onnx), "--runtime", "ort", "--runs", "1"]


def _deep_annotation(t, run_folder, exported, monkeypatch):
    data = _copy(run_folder[1], t / "d")
    (data / "retrieval_test.json").write_text(DEEP)
    return ["eval", "demo-clip", "--data", str(data), "--limit", "2"]


def _deep_header(t, run_folder, exported, monkeypatch):
    slim = _copy(exported[0], t / "s")
    header = ("{\"a\":" * 100 + "1" + "}" * 100).encode()
    (slim / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    _edit_json(slim / "upop_manifest.json", lambda m: m["weights"].update(
        sha256=__import__("hashlib").sha256((slim / "model.safetensors").read_bytes()).hexdigest()))
    return ["eval", str(slim), "--data", str(run_folder[1])]


DEEP_CASES = {"latest.json": (_deep_latest, "latest.json is nested"),
              "upop_manifest.json": (_deep_manifest, "upop_manifest.json is nested"),
              "config.json": (_deep_config, "config.json is nested"),
              "export.json (predict)": (_deep_export, "export.json is damaged (nested"),
              "export.json (profile)": (_deep_export_profile, "export.json is damaged (nested"),
              "annotation file": (_deep_annotation, "retrieval_test.json is nested"),
              "safetensors header": (_deep_header, "is not a valid safetensors file")}


@pytest.mark.parametrize("case", list(DEEP_CASES))
def test_deeply_nested_json_anywhere_is_one_line(run_folder, exported, tmp_path, monkeypatch, case):
    make, match = DEEP_CASES[case]
    _one_line(runner.invoke(app, make(tmp_path, run_folder, exported, monkeypatch)), match)


def _manifest_config(edit):
    def make(t, run_folder, exported, monkeypatch):
        slim = _copy(exported[0], t / "s")
        _edit_json(slim / "upop_manifest.json", lambda m: edit(m["base_config"]))
        return ["eval", str(slim), "--data", str(run_folder[1])]
    return make


def _model_folder(edit=None, weights=None, config=None):
    def make(t, run_folder, exported, monkeypatch):
        model = _copy(run_folder[0], t / "m")
        if edit is not None:
            _edit_json(model / "config.json", edit)
        if config is not None:
            (model / "config.json").write_text(config)
        if weights == "pickle-only":
            import torch

            (model / "model.safetensors").unlink()
            torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
        return ["eval", str(model), "--data", str(run_folder[1])]
    return make


def _plain_pickle_state(t, run_folder, exported, monkeypatch):
    import pickle

    (t / "r.partial").mkdir()
    (t / "r.partial" / ".upop-run").write_text("upop run state; created by upop: yes\n")
    (t / "r.partial" / "state.pt").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    model, data = run_folder
    return ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data), "--out", str(t / "r"),
            "--resume", "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "4", "--no-latency"]


def _plain_pickle_nlvr(t, run_folder, exported, monkeypatch):
    import pickle

    (t / "n.pth").write_bytes(pickle.dumps({"model": {"a": 1}}, protocol=4))
    return ["convert", "nlvr", str(t / "n.pth"), "--out", str(t / "o")]


def _garbage_onnx(t, run_folder, exported, monkeypatch):
    onnx = _copy(exported[1], t / "e")
    for f in onnx.glob("*.onnx"):
        f.write_bytes(b"\x00garbage" * 10)
    return ["profile", str(onnx), "--runtime", "ort", "--runs", "1"]


def _edited_task(t, run_folder, exported, monkeypatch):
    onnx = _copy(exported[1], t / "e")
    _edit_json(onnx / "export.json", lambda m: m.update(task="caption"))
    return ["predict", str(onnx), "-i", str(exported[2])]


ONE_LINE = {
    "manifest hidden_size a string": (_manifest_config(lambda c: c.update(hidden_size="64")),
                                      "hidden_size must be an integer in 1..1048576, got '64'"),
    "manifest of 100000 layers": (_manifest_config(lambda c: c.update(num_hidden_layers=100000)),
                                  "num_hidden_layers 100000), the weights hold"),
    "config.json of 100000 layers": (_model_folder(lambda c: c.update(num_hidden_layers=100000)),
                                     "the config does not belong to these weights"),
    "config.json hidden_size a string": (_model_folder(lambda c: c.update(hidden_size="big")),
                                         "hidden_size must be an integer"),
    "pytorch_model.bin only": (_model_folder(weights="pickle-only"), "only as pytorch_model.bin, a pickle"),
    "auto_map": (_model_folder(lambda c: c.update(auto_map={"AutoConfig": "x.Y"})), "asks for custom code (auto_map)"),
    "unknown model_type": (_model_folder(lambda c: c.update(model_type="frobnicator")),
                           "model_type 'frobnicator' is not an architecture upop knows"),
    "plain pickle as state.pt": (_plain_pickle_state, "which upop never loads"),
    "plain pickle as an NLVR checkpoint": (_plain_pickle_nlvr, "which upop never loads"),
    "garbage .onnx under profile": (_garbage_onnx, "cannot be loaded (damaged or not an ONNX graph)"),
    "predict on an edited task": (_edited_task, "export.json says task caption, which a vit export does not do"),
}


@pytest.mark.parametrize("case", list(ONE_LINE))
def test_each_former_traceback_is_one_line(run_folder, exported, tmp_path, monkeypatch, case):
    make, match = ONE_LINE[case]
    argv = make(tmp_path, run_folder, exported, monkeypatch)
    t0 = time.perf_counter()
    r = runner.invoke(app, argv)
    _one_line(r, match)
    assert "Warning" not in r.output and time.perf_counter() - t0 < 30
    monkeypatch.setenv("UPOP_DEBUG", "1")
    r = runner.invoke(app, argv)
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_predict_text_on_a_classifier_is_refused(exported):
    _, onnx, image = exported
    _one_line(runner.invoke(app, ["predict", str(onnx), "-i", str(image), "-t", "a cat"]),
              "--text does not apply to a classification model")


def test_export_batch_only_applies_to_tensorrt(exported, tmp_path):
    slim = exported[0]
    _one_line(runner.invoke(app, ["export", str(slim), "--out", str(tmp_path / "e"), "--batch", "64:8:1"]),
              "--batch 64:8:1 is TensorRT's optimization profile or the latency batch of --precision's table: it does "
              "not apply to a plain --format onnxruntime export")
    _one_line(runner.invoke(app, ["export", str(slim), "--out", str(tmp_path / "e"), "--precision", "fp16",
                                  "--batch", "64:8:1"]), "--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    _one_line(runner.invoke(app, ["export", str(slim), "--format", "trt", "--out", str(tmp_path / "e"),
                                  "--batch", "64:8:1"]), "--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    assert not (tmp_path / "e").exists()


def test_profile_overwrite_without_a_file_is_refused(run_folder):
    _one_line(runner.invoke(app, ["profile", str(run_folder[0]), "--overwrite"]), "--overwrite replaces the file")
    assert os.environ.get("UPOP_DEBUG") is None


def test_a_graph_of_another_model_is_one_error(exported):
    """What predict hit as ``KeyError: 'input_ids'``: a graph fed what another task gives."""
    import numpy as np

    from upop.errors import ExportFolderError
    from upop.exporters.runtime import OrtModel

    m = OrtModel(exported[1], providers=["CPUExecutionProvider"])
    with pytest.raises(ExportFolderError, match="graph classifier takes pixel_values, not what a classification"):
        m.run("classifier", input_ids=np.zeros((1, 4), dtype=np.int64))
    with pytest.raises(ExportFolderError, match="cannot run on these inputs"):
        m.run("classifier", pixel_values=np.zeros((1, 3, 7, 7), dtype=np.float32))


# -- options that do not apply, caps said once, a diverging loss ---------------------------------------------

@pytest.fixture
def fake_run(monkeypatch):
    """upop.compress replaced (test_cli_safety's stand-in): the calls are recorded, nothing is trained."""
    from .test_cli_safety import FakeResult

    calls = []
    monkeypatch.setattr(upop, "compress", lambda *a, **k: calls.append(k) or FakeResult())
    return calls


NOT_APPLYING = [
    (["--distill-weight", "2"], "--distill-weight does not apply to this run (it tunes --distill, which is off)"),
    (["--distill-temperature", "2"], "--distill-temperature does not apply"),
    (["--distill", "features", "--distill-temperature", "2"], "--distill features has none"),
    (["--no-distill-search"], "--distill-search does not apply"),
    (["--teacher", "demo-vit"], "--teacher does not apply"),
    (["--k-test", "5"], "--k-test does not apply to this run (only BLIP retrieval uses it; this run is vit classif"),
    (["--no-momentum"], "--momentum does not apply to this run (only BLIP retrieval uses it"),
]


@pytest.mark.parametrize("flags,match", NOT_APPLYING, ids=[" ".join(f) for f, _m in NOT_APPLYING])
def test_a_flag_that_does_not_apply_is_refused(run_folder, tmp_path, fake_run, flags, match):
    model, data = run_folder
    r = runner.invoke(app, ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data),
                            "--out", str(tmp_path / "o"), *flags])
    _one_line(r, match)
    assert fake_run == []


def test_an_option_from_a_file_that_does_not_apply_is_said_once(run_folder, tmp_path, fake_run):
    model, data = run_folder
    cfg = tmp_path / "run.toml"
    cfg.write_text("distill_weight = 2.0\nk_test = 7\n")
    r = runner.invoke(app, ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data),
                            "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.count(f"note: distill_weight from --config {cfg} is not used") == 1, r.output
    assert r.output.count("note: k_test from") == 1 and len(fake_run) == 1


def test_the_batch_is_capped_by_the_split_and_said_once(run_folder, tmp_path):
    model, data = run_folder
    r = runner.invoke(app, ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data), "--out",
                            str(tmp_path / "o"), "--batch-size", "100000", "--search-epochs", "1", "--retrain-epochs",
                            "1", "--no-latency", "--json"])
    assert r.exit_code == 0, r.output
    assert r.output.count("note: batch size 100,000 is more than the 24 training items") == 1, r.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["distributed"]["per_rank_batch"] == 24 and report["distributed"]["effective_batch"] == 24


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_state(run_folder, tmp_path):
    model, data = run_folder
    r = runner.invoke(app, ["compress", "--model", str(model), "--ratio", "0.5", "--data", str(data), "--out",
                            str(tmp_path / "o"), "--batch-size", "4", "--lr", "1e30", "--search-epochs", "3",
                            "--checkpoint-every", "1", "--no-latency", "--quiet"])
    _one_line(r, "the search loss is nan at step")
    assert "(lr 1e+30)" in r.output and "the last good state is kept in" in r.output
    assert not (tmp_path / "o").exists() and (tmp_path / "o.partial" / "state.pt").is_file()
    import torch

    state = torch.load(tmp_path / "o.partial" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["search"]["model"].values() if v.is_floating_point())


def test_workers_are_capped_by_cores_and_memory_and_said_once(monkeypatch, capsys):
    from upop.datasets import loading as data_mod
    from upop.run.safety import forget_notes

    forget_notes()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(data_mod, "_available_memory", lambda: 5 * 2**30 // 2)  # 2.5 GiB: 8 workers' worth
    assert data_mod.cap_workers(999) == 4 and data_mod.cap_workers(999) == 4 and data_mod.cap_workers(2) == 2
    monkeypatch.setattr(data_mod, "_available_memory", lambda: 700 << 20)
    assert data_mod.cap_workers(3) == 2
    err = capsys.readouterr().err
    assert err.count("note: --workers 999 capped to 4 (4 core(s) per process") == 1
    assert "note: --workers 3 capped to 2" in err


def test_an_imagefolder_of_tif_images_is_read_and_other_files_are_said(tmp_path, capsys):
    from PIL import Image

    from upop.datasets.readers import read_classification
    from upop.run.safety import forget_notes

    forget_notes()
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "1.tif")
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "2.png")
    (tmp_path / "a" / "notes.txt").write_text("x")
    items, classes = read_classification(tmp_path)
    assert sorted(p.name for p, _ in items) == ["1.tif", "1.tif", "2.png", "2.png"] and classes == ["a", "b"]
    assert "1 file(s) that are not images upop reads (notes.txt) are left out" in capsys.readouterr().err
