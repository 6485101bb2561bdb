"""Every bad value of every command is one line naming the option, exit 2, before anything runs."""

import pytest
from typer.testing import CliRunner

import upop
import upop.exporters.timing
from upop_cli.app import app

from ..conftest import vit_run_folder

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


PROFILE = [
    (["--runs", "0"], "--runs must be an integer >= 1, got 0"),
    (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["--batch", "1", "--batch", "-4"], "--batch must be an integer >= 1, got -4"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--runtime", "foo"], "--runtime must be torch or ort or trt, got 'foo'"),
    (["--precision", "int4"], "--precision must be fp32 or fp16, got 'int4'"),
    (["--device", "tpu"], "--device must be cpu or cuda, got 'tpu'"),
]


@pytest.mark.parametrize("flags,match", PROFILE, ids=[" ".join(f) for f, _m in PROFILE])
def test_profile_options(run_folder, flags, match, monkeypatch):
    import upop.latency

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
    import upop.calibrate

    (tmp_path / "my.toml").write_text("mine")
    monkeypatch.setattr(upop.calibrate, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    for extra in ([], ["--overwrite"]):  # a file upop did not write is never replaced
        r = runner.invoke(app, ["profiles", "calibrate", "--model", "demo-vit", "--out", str(tmp_path / "my.toml"),
                                *extra])
        _one_line(r, "my.toml exists and is not a hardware profile written by upop")
    assert (tmp_path / "my.toml").read_text() == "mine"
    from upop.calibrate import to_toml
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
    _one_line(r, "--runtime must be torch or ort or trt, got 'foo'")
