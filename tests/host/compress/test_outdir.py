from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import outdir


def test_prepare_creates_nested_directories_and_leaves_nothing(tmp_path):
    path = outdir.prepare(tmp_path / "a" / "b")
    assert path.is_dir() and list(path.iterdir()) == []


def test_prepare_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"output directory .*file/out: cannot write there"):
        outdir.prepare(tmp_path / "file" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_prepare_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write there"):
            outdir.prepare(locked)
    finally:
        locked.chmod(0o700)


def test_write_atomic_replaces_with_normal_permissions(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    outdir.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_write_atomic_cleans_up_when_the_rename_fails(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "child").write_text("so the directory cannot be replaced")
    with pytest.raises(OSError):
        outdir.write_atomic(tmp_path / "taken", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_prepare_removes_what_a_killed_run_left_while_staging(tmp_path):
    # a SIGKILL between staging and the moves leaves .slimfleet-output-* behind
    out = tmp_path / "out"
    stale = out / f"{outdir.STAGE_PREFIX}killed"
    fresh = out / f"{outdir.STAGE_PREFIX}running"
    for stage in (stale, fresh):
        stage.mkdir(parents=True)
        (stage / "model.onnx").write_bytes(b"half")
    old = stale.stat().st_mtime - outdir.STALE_STAGE_S - 60
    os.utime(stale, (old, old))
    assert outdir.prepare(out) == out  # staging leftovers alone are not the user's files
    assert not stale.exists()
    assert (fresh / "model.onnx").exists()  # maybe another run's, in the middle of its moves
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not empty"):
        outdir.prepare(out)


def _earlier_output(path: Path) -> Path:
    path.mkdir()
    (path / outdir.REPORT_JSON).write_text('{"slimfleet_version": "0"}')
    (path / outdir.CONVERTED).write_bytes(b"onnx")
    return path


def test_a_front_end_runs_conversion_is_stale_only_in_its_own_earlier_output(tmp_path):
    out = _earlier_output(tmp_path / "out")
    assert outdir.stale_files(out, tmp_path / "other.onnx") == (outdir.CONVERTED,)
    # compressing that conversion itself into its own directory (--force) keeps it
    assert outdir.stale_files(out, out / outdir.CONVERTED) == ()
    # a user's directory written into with --force: its converted.onnx is the user's
    (out / outdir.REPORT_JSON).unlink()
    assert outdir.stale_files(out, tmp_path / "other.onnx") == ()


def test_staged_removes_the_stale_files_the_new_output_lacks(tmp_path):
    out = _earlier_output(tmp_path / "out")
    with outdir.staged(out, stale=(outdir.CONVERTED,)) as stage:
        (stage / outdir.MODEL).write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == [outdir.MODEL, outdir.REPORT_JSON]
