import json

import pytest
import torch

import upop
from upop.run.checkpoint import FORMAT_VERSION, MANIFEST, WEIGHTS
from upop.errors import CheckpointError

from ...conftest import batches_for, build_tiny


def _compress(adapter, model, ratio=0.5, gran="dim"):
    cfg = upop.CompressConfig(ratio=ratio, granularity=gran,
                              search=upop.SearchConfig(steps=4, update_every=2, lr=1e-4),
                              retrain=upop.RetrainConfig(epochs=1, steps_per_epoch=1))
    return upop.compress(model, cfg, batches=batches_for(adapter, model, n=2))


def test_round_trip_is_bit_exact(tiny, tmp_path):
    adapter, model = tiny
    res = _compress(adapter, model, gran="head" if "Blip" in type(model).__name__ else "dim")
    out = res.save(tmp_path / "slim")
    loaded = upop.load(out)
    sd1, sd2 = res.model.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    batch = batches_for(adapter, model, n=1, seed=9)[0]
    res.model.eval()
    with torch.no_grad():
        a, b = adapter.forward_outputs(res.model, batch), adapter.forward_outputs(loaded, batch)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["family"] == adapter.family and manifest["format_version"] == FORMAT_VERSION
    assert manifest["stages"][0]["kept"] == res.search.kept
    assert manifest["weights"]["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from upop.adapters import get_adapter

    adapter = get_adapter("vit")
    model = build_tiny("vit", "ViTForImageClassification")
    res = _compress(adapter, model)
    return res, res.save(tmp_path_factory.mktemp("ck") / "slim")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_are_refused(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "c")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or was replaced"):
        upop.load(d)


def test_weights_of_another_model_are_refused(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "c")
    manifest = json.loads((d / MANIFEST).read_text())
    # Kept units that do not match the weights, with a hash that matches the file.
    name = next(iter(manifest["stages"][0]["kept"]))
    manifest["stages"][0]["kept"][name] = [0]
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not fit the manifest"):
        upop.load(d)


def test_newer_format_is_refused(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "c")
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer upop"):
        upop.load(d)


@pytest.mark.parametrize("damage", ["no_manifest", "bad_json", "no_weights", "not_a_folder", "missing_key"])
def test_damaged_folders_are_refused(saved, tmp_path, damage):
    d = _copy(saved[1], tmp_path / "c")
    if damage == "no_manifest":
        (d / MANIFEST).unlink()
        match = "not a upop slim checkpoint"
    elif damage == "bad_json":
        (d / MANIFEST).write_text("{not json")
        match = "not valid JSON"
    elif damage == "no_weights":
        (d / WEIGHTS).unlink()
        match = "missing"
    elif damage == "missing_key":
        m = json.loads((d / MANIFEST).read_text())
        del m["stages"]
        (d / MANIFEST).write_text(json.dumps(m))
        match = "missing the key"
    else:
        d = d / WEIGHTS
        match = "not a folder"
    with pytest.raises(CheckpointError, match=match):
        upop.load(d)


def test_existing_folder_is_left_untouched_without_overwrite(saved, tmp_path):
    res, _ = saved
    out = tmp_path / "slim"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder upop did not write is never replaced
        with pytest.raises(CheckpointError, match="already exists and was not written by upop"):
            res.save(out, overwrite=overwrite)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    mine = res.save(tmp_path / "mine")
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        res.save(mine)
    res.save(mine, overwrite=True)  # upop's own checkpoint is replaced
    assert (mine / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "slim"]


def _edit_manifest(d, edit):
    m = json.loads((d / MANIFEST).read_text())
    edit(m)
    (d / MANIFEST).write_text(json.dumps(m))


def _first_module(m):
    return next(iter(m["stages"][0]["kept"]))


HOSTILE = {
    "family_not_str": (lambda m: m.update(family=5), "family must be a string"),
    "base_config_list": (lambda m: m.update(base_config=[1]), "base_config must be an object"),
    "stages_dict": (lambda m: m.update(stages={"a": 1}), "stages must be a list"),
    "kept_list": (lambda m: m["stages"][0].update(kept=[1, 2]), "kept and units must be objects"),
    "kept_strings": (lambda m: m["stages"][0]["kept"].update({_first_module(m): ["a"]}), "distinct integers"),
    "kept_out_of_range": (lambda m: m["stages"][0]["kept"].update({_first_module(m): [10**6]}), "distinct integers"),
    "kept_duplicates": (lambda m: m["stages"][0]["kept"].update({_first_module(m): [0, 0]}), "distinct integers"),
    "units_bool": (lambda m: m["stages"][0]["units"].update({_first_module(m): True}), "positive integer"),
    "weights_escape": (lambda m: m["weights"].update(file="../../etc/passwd"), "leaves its folder"),
    "weights_absolute": (lambda m: m["weights"].update(file="/etc/passwd"), "leaves its folder"),
    "weights_not_str": (lambda m: m["weights"].update(file=3), "not a file name"),
    "sha_missing": (lambda m: m.update(weights={"file": WEIGHTS}), "sha256 string"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_manifest_fields_of_the_wrong_type_are_one_clear_error(saved, tmp_path, case):
    d = _copy(saved[1], tmp_path / "c")
    edit, match = HOSTILE[case]
    _edit_manifest(d, edit)
    with pytest.raises(CheckpointError, match=match):
        upop.load(d)


def test_manifest_sizes_beyond_the_weights_file_are_refused_before_allocating(saved, tmp_path, monkeypatch):
    """A base config asking for a huge model (its hash matching a tiny weights file) never allocates it."""
    from upop.run import checkpoint

    d = _copy(saved[1], tmp_path / "c")
    _edit_manifest(d, lambda m: m["base_config"].update(image_size=2**15))
    built = []
    real = checkpoint.build_structure
    monkeypatch.setattr(checkpoint, "build_structure",
                        lambda info: built.append(str(__import__("torch").empty(0).device)) or real(info))
    with pytest.raises(CheckpointError, match="the manifest describes .* parameters, the weights file holds"):
        upop.load(d)
    assert built == ["meta"]  # only the meta-device build ran


def test_safetensors_header_claiming_more_than_the_file_is_refused(saved, tmp_path):
    import struct

    from upop.run.checkpoint import sha256_file

    d = _copy(saved[1], tmp_path / "c")
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    _edit_manifest(d, lambda m: m["weights"].update(sha256=sha256_file(d / WEIGHTS)))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        upop.load(d)


def test_a_slim_model_can_be_compressed_again(saved, tmp_path):
    from upop.adapters import get_adapter

    res, path = saved
    adapter = get_adapter("vit")
    model = upop.load(path)
    again = _compress(adapter, model, ratio=0.3)
    out = again.save(tmp_path / "twice")
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["stages"]) == 2
    loaded = upop.load(out)
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in res.model.parameters())
