"""upop.run.safety: what upop may replace, the lock per output, the room check, names from untrusted files."""

import json
import os
import subprocess
import sys
import time

import pytest

from upop.errors import CheckpointError, OutputError, OutputExistsError
from upop.run.safety import (STATE_MARKER, OutputLock, check_replace, check_room, check_state_folder, is_run_state,
                         lock_path, member, owned_by_upop)


def _folder(path, **files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_owned_folders_are_recognised_by_upops_own_marker(tmp_path):
    assert not owned_by_upop(_folder(tmp_path / "slim", **{"manifest.json": "{}"}))
    assert owned_by_upop(_folder(tmp_path / "slim2", **{"upop_manifest.json": "{}"}))
    assert owned_by_upop(_folder(tmp_path / "exp", **{"export.json": json.dumps({"upop_version": "0.1"})}))
    assert not owned_by_upop(_folder(tmp_path / "other-exp", **{"export.json": json.dumps({"rows": 3})}))
    assert not owned_by_upop(_folder(tmp_path / "damaged-exp", **{"export.json": "{not json"}))
    trt = _folder(tmp_path / "trt", **{"engines.json": json.dumps({"format": "tensorrt"})})
    assert not owned_by_upop(trt)  # a common name: upop's own ONNX export beside it marks a runtime's folder
    _folder(trt / "onnx", **{"export.json": json.dumps({"upop_version": "0.1"})})
    assert owned_by_upop(trt)
    assert owned_by_upop(_folder(tmp_path / "run", **{STATE_MARKER: ""}))
    assert owned_by_upop(_folder(tmp_path / "conv", **{"upop_convert.json": "{}"}))
    assert not owned_by_upop(_folder(tmp_path / "proj", **{"notes.txt": "mine"}))
    assert not owned_by_upop(tmp_path / "missing")


def test_check_replace_refuses_every_folder_upop_did_not_write(tmp_path):
    proj = _folder(tmp_path / "proj", **{"notes.txt": "mine"})
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not written by upop"):
            check_replace(proj, overwrite=overwrite)
    assert (proj / "notes.txt").read_text() == "mine"
    mine = _folder(tmp_path / "mine", **{"upop_manifest.json": "{}"})
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_replace(mine, overwrite=False)
    check_replace(mine, overwrite=True)
    check_replace(_folder(tmp_path / "empty"), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is not a folder"):
        check_replace(tmp_path / "file", overwrite=True)
    check_replace(tmp_path / "new", overwrite=False)


@pytest.mark.parametrize("out,rel", [("src", "is"), ("src/inner", "is inside"), (".", "contains")])
def test_out_equal_to_inside_or_above_the_source_is_refused(tmp_path, out, rel):
    src = _folder(tmp_path / "src", **{"upop_manifest.json": "{}"})
    with pytest.raises(OutputError, match=f"--out .* {rel} the source"):
        check_replace(tmp_path / out, overwrite=True, sources=[src])
    assert (src / "upop_manifest.json").is_file()


def test_data_may_hold_the_output_but_not_be_replaced(tmp_path):
    data = _folder(tmp_path / "data", **{"a.json": "[]"})
    check_replace(data / "out", overwrite=False, inputs=[data])
    for out in (data, tmp_path):
        with pytest.raises(OutputError, match="the source"):
            check_replace(out, overwrite=True, inputs=[data])
    check_replace(tmp_path / "elsewhere", overwrite=False, sources=["some/hub-id"], inputs=[None])


def test_the_state_folder_is_upops_only_with_its_marker(tmp_path):
    out = tmp_path / "r"
    assert check_state_folder(out) == tmp_path / "r.partial"  # none yet
    partial = _folder(tmp_path / "r.partial", **{"important.txt": "keep"})
    with pytest.raises(OutputError, match="r.partial exists and is not a upop run state"):
        check_state_folder(out)
    assert (partial / "important.txt").read_text() == "keep"
    (partial / STATE_MARKER).write_text("")
    assert check_state_folder(out) == partial
    assert is_run_state(_folder(tmp_path / "old.partial", **{"state.pt": "x"}))  # written before the marker
    assert is_run_state(_folder(tmp_path / "empty.partial"))
    assert not is_run_state(_folder(tmp_path / "mixed.partial", **{"state.pt": "x", "mine.txt": "y"}))


def test_names_from_untrusted_files_stay_in_their_folder(tmp_path):
    assert member(tmp_path, "model.safetensors", "weights file", CheckpointError) == tmp_path / "model.safetensors"
    assert member(tmp_path, "onnx/a.onnx", "graph", CheckpointError) == tmp_path / "onnx" / "a.onnx"
    for bad in ("../x", "/etc/passwd", "a/../../x", "..", ".", "", 5, None, "a\\..\\x", "a\x00b"):
        with pytest.raises(CheckpointError, match="leaves its folder|is not a file name"):
            member(tmp_path, bad, "weights file", CheckpointError)


def test_room_and_writability_are_checked_before_the_run(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    check_room(tmp_path / "a" / "b" / "out", 1 << 20)  # the nearest existing parent is checked
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 5 << 20))
    with pytest.raises(OutputError, match="has 5 MiB free; this run needs about 400 MiB"):
        check_room(tmp_path / "out", 400 << 20)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_room(tmp_path / "file" / "out", 0)


HOLD = """
import sys, time
from upop.run.safety import OutputLock
lock = OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_output_stops_at_once(tmp_path):
    out = tmp_path / "r"
    proc = _holder(out)
    try:
        t0 = time.perf_counter()
        with pytest.raises(OutputError, match=f"another upop run \\(pid {proc.pid}\\) is writing .*r; wait"):
            OutputLock(out).acquire()
        assert time.perf_counter() - t0 < 1
        with OutputLock(tmp_path / "other"):  # another output is not locked
            pass
    finally:
        proc.kill()
        proc.wait()
    # The holder was killed: its lock died with it; the leftover file is taken over.
    assert lock_path(out).is_file()
    with OutputLock(out) as lock:
        assert lock_path(out).read_text() == f"upop output lock\npid {os.getpid()}\n"
        with pytest.raises(OutputError, match="another upop run"):
            OutputLock(out).acquire()  # held, even within one process
    assert not lock_path(out).exists()  # released on exit
    assert lock.fd is None


def test_the_lock_is_one_line_when_the_folder_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write .*file/out"):
        OutputLock(tmp_path / "file" / "out").acquire()


# -- round two: ownership by content, links, kinds, locks, files, modes, JSON ------------------------------

from upop.run.safety import (OWNED_RECORD, check_file, foreign_entries, load_json, marker_kind,  # noqa: E402
                         output_dir, write_file)


def _written(path, kind="slim", **files):
    with output_dir(path, kind) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["recorded", "older-upop"])
def test_a_file_the_user_added_to_an_output_keeps_it_from_being_replaced(tmp_path, legacy):
    out = _written(tmp_path / "o", **{"upop_manifest.json": "{}", "model.safetensors": "w", "sub/a.onnx": "g"})
    if legacy:
        (out / OWNED_RECORD).unlink()
    check_replace(out, overwrite=True, kind="slim")  # upop's own files only: replaceable
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "mine.txt").write_text("mine too")
    with pytest.raises(OutputExistsError, match=r"holds notes.txt, sub/mine.txt, which upop did not write"):
        check_replace(out, overwrite=True, kind="slim")
    with pytest.raises(OutputExistsError, match="notes.txt"):  # and at the moment of publishing, too
        _written(out, **{"upop_manifest.json": "{}"})
    assert (out / "notes.txt").read_text() == "mine" and foreign_entries(out) == ["notes.txt", "sub/mine.txt"]


def test_the_record_lists_every_file_and_the_kind(tmp_path):
    out = _written(tmp_path / "o", "export", **{"a.onnx": "g", "d/b.onnx": "g"})
    rec = json.loads((out / OWNED_RECORD).read_text())
    assert rec["kind"] == "export" and rec["files"] == ["a.onnx", "d/b.onnx"] and marker_kind(out) == "export"


@pytest.mark.parametrize("target", ["empty-folder", "upop-output", "missing"])
def test_a_link_given_as_out_is_never_replaced(tmp_path, target):
    real = tmp_path / "real"
    if target == "empty-folder":
        real.mkdir()
    elif target == "upop-output":
        _written(real, **{"upop_manifest.json": "{}"})
    link = tmp_path / "link2"
    link.symlink_to(real)
    with pytest.raises(OutputExistsError, match="is a symbolic link; upop never replaces a link"):
        check_replace(link, overwrite=True, kind="slim")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        _written(link, **{"upop_manifest.json": "{}"})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["link2", *(["real"] if target != "missing" else [])])


@pytest.mark.parametrize("have,want", [("slim", "export"), ("export", "slim"), ("convert", "slim"),
                                       ("shapes", "export")])
def test_one_kind_of_output_never_replaces_another(tmp_path, have, want):
    out = _written(tmp_path / "o", have, **{"x.json": "{}"})
    with pytest.raises(OutputExistsError, match="and this command writes a .*one kind of output never replaces"):
        check_replace(out, overwrite=True, kind=want)
    with pytest.raises(OutputExistsError, match="one kind of output never replaces another"):
        _written(out, want, **{"y.json": "{}"})
    assert (out / "x.json").is_file()


def test_the_cache_is_protected_from_out(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "shapes-v2").mkdir(parents=True)
    monkeypatch.setenv("UPOP_CACHE", str(cache))
    for out in (cache, cache / "shapes-v2", tmp_path):
        with pytest.raises(OutputError, match="the source .*cache"):
            check_replace(out, overwrite=True, kind="slim")


def test_a_users_lock_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "r"
    lock_path(out).write_text("my notes")
    with pytest.raises(OutputError, match=r"r.lock exists and is not a upop lock"):
        OutputLock(out).acquire()
    assert lock_path(out).read_text() == "my notes"


def test_a_lock_that_is_a_link_is_never_followed(tmp_path):
    mine = tmp_path / "precious.txt"
    mine.write_text("keep me")
    lock_path(tmp_path / "r").symlink_to(mine)
    with pytest.raises(OutputError, match="is not a upop lock"):
        OutputLock(tmp_path / "r").acquire()
    assert mine.read_text() == "keep me" and lock_path(tmp_path / "r").is_symlink()


def test_a_lock_replaced_by_the_user_while_held_is_left_alone(tmp_path):
    lock = OutputLock(tmp_path / "r").acquire()
    lock_path(tmp_path / "r").unlink()
    lock_path(tmp_path / "r").write_text("the user's now")
    lock.release()
    assert lock_path(tmp_path / "r").read_text() == "the user's now"


def _is_result(path):
    return json.loads(path.read_text()).get("runs") is not None


def test_a_file_output_replaces_only_upops_own_file_and_with_overwrite(tmp_path):
    user = tmp_path / "user.json"
    user.write_text('{"mine": 1}')
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is not a profile result written by upop"):
            write_file(user, "{}", kind="profile-json", overwrite=overwrite, recognise=_is_result)
    assert user.read_text() == '{"mine": 1}'
    own = write_file(tmp_path / "a" / "b" / "r.json", '{"runs": []}', kind="profile-json", overwrite=False,
                     recognise=_is_result)  # the missing folders are made
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        write_file(own, '{"runs": [1]}', kind="profile-json", overwrite=False, recognise=_is_result)
    write_file(own, '{"runs": [1]}', kind="profile-json", overwrite=True, recognise=_is_result)
    assert json.loads(own.read_text()) == {"runs": [1]} and sorted(os.listdir(own.parent)) == ["r.json"]
    (tmp_path / "l.json").symlink_to(user)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        write_file(tmp_path / "l.json", "{}", kind="profile-json", overwrite=True, recognise=_is_result)
    with pytest.raises(OutputExistsError, match="is a folder"):
        check_file(tmp_path, kind="profile-json", overwrite=True, recognise=_is_result)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = _written(tmp_path / "o", **{"upop_manifest.json": "{}", "d/w.bin": "x"})
        f = write_file(tmp_path / "f.json", "{}", kind="latest", overwrite=False, recognise=lambda p: True)
    finally:
        os.umask(old)
    for p in (out / "upop_manifest.json", out / "d" / "w.bin", out / OWNED_RECORD, f):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    for p in (out, out / "d"):
        assert p.stat().st_mode & 0o777 == 0o777 & ~mask, p


@pytest.mark.parametrize("depth", [70, 100_000])
def test_deeply_nested_json_is_one_line(depth):
    with pytest.raises(CheckpointError, match="x.json is nested more than 64 levels deep"):
        load_json("[" * depth + "]" * depth, "x.json", CheckpointError)
    assert load_json("[" * 60 + "]" * 60, "x.json", CheckpointError) is not None


def test_a_slim_checkpoint_and_latest_json_get_the_users_umask(tmp_path):
    """They were 0600 (a temporary file's mode): a teammate on a shared cluster could not read the model."""
    import upop
    from upop.adapters import get_adapter
    from upop_cli.latest import write_latest

    from ...conftest import batches_for, build_tiny

    model = build_tiny("vit", "ViTForImageClassification")
    cfg = upop.CompressConfig(ratio=0.5, search=upop.SearchConfig(steps=1, update_every=1),
                              retrain=upop.RetrainConfig(epochs=0))
    res = upop.compress(model, cfg, batches=batches_for(get_adapter("vit"), model, n=1))
    old = os.umask(0o002)
    try:
        out = res.save(tmp_path / "upop-out" / "slim")
        record = write_latest(out, "m")
    finally:
        os.umask(old)
    for f in (out / "model.safetensors", out / "upop_manifest.json", out / "report.json", record):
        assert f.stat().st_mode & 0o777 == 0o664, f
    assert out.stat().st_mode & 0o777 == 0o775
