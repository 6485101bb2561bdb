import json
import subprocess
import sys

import pytest

import upop
from upop_cli.errors import run_guarded

from ..conftest import batches_for, build_tiny


@pytest.fixture(scope="module")
def slim_dir(tmp_path_factory):
    adapter = upop.adapters.get_adapter("clip")
    model = build_tiny("clip", "CLIPModel")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=2, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(adapter, model, n=1))
    return res.save(tmp_path_factory.mktemp("cli") / "slim")


def _upop(*args, env=None):
    return subprocess.run([sys.executable, "-m", "upop_cli.app", *args], capture_output=True, text=True, env=env)


def test_inspect_prints_sizes_per_tower(slim_dir):
    r = _upop("inspect", str(slim_dir), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {m["tower"] for m in data["modules"]} == {"vision", "text"}
    assert data["params"]["total"] > 0 and data["flops"]["total"] > 0
    import os

    r = _upop("inspect", str(slim_dir), env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "vision_model.encoder.layers.0.self_attn" in r.stdout


def test_inspect_on_a_folder_that_is_not_a_checkpoint_is_one_line(tmp_path):
    r = _upop("inspect", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a upop slim checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


def test_debug_variable_shows_the_traceback(tmp_path):
    import os

    r = _upop("inspect", str(tmp_path), env={**os.environ, "UPOP_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_guard_maps_errors_to_exit_codes(capfd):
    def boom():
        raise upop.ConfigError("ratio must be strictly between 0 and 1, got 2")

    assert run_guarded(boom) == 2
    assert capfd.readouterr().err == "error: ratio must be strictly between 0 and 1, got 2\n"

    def interrupted():
        raise KeyboardInterrupt

    assert run_guarded(interrupted) == 130
