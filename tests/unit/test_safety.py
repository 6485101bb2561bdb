"""upop.safety: what upop may replace, the lock per output, the room check, names from untrusted files."""

import json
import os
import subprocess
import sys
import time

import pytest

from upop.errors import CheckpointError, OutputError, OutputExistsError
from upop.safety import (STATE_MARKER, OutputLock, check_replace, check_room, check_state_folder, is_run_state,
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
    assert owned_by_upop(_folder(tmp_path / "trt", **{"engines.json": json.dumps({"format": "tensorrt"})}))
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
from upop.safety import OutputLock
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
