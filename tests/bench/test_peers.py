"""peers: what a peer's library leaves in the current directory stays in the workdir."""

from __future__ import annotations

import os
from pathlib import Path

import benchlib
import peers

GIB = 1 << 30


def test_a_peer_runs_inside_its_workdir_so_its_stray_files_go_with_it(tmp_path, monkeypatch):
    # onnxruntime's symbolic shape inference saves sym_shape_infer_temp.onnx and a
    # <uuid>.data of all the weights into the current directory when it gives up
    here, workdir = tmp_path / "here", tmp_path / "work"
    here.mkdir()
    workdir.mkdir()
    monkeypatch.chdir(here)

    def build(model, calibration, workdir_seen, target, validate):
        Path("sym_shape_infer_temp.onnx").write_text("stray")
        target.write_text(Path(model).read_text())

    Path("model.onnx").write_text("model")  # relative, as a user may give it
    peer = peers.Peer("stray writer", build)
    watched = benchlib.run_bounded(
        lambda: peer.build_in(workdir, "model.onnx", [], workdir / "peer.onnx", None),
        timeout_s=30,
        max_rss=4 * GIB,
    )
    assert watched.error is None
    assert os.listdir(here) == ["model.onnx"]
    assert sorted(os.listdir(workdir)) == ["peer.onnx", "sym_shape_infer_temp.onnx"]
    assert (workdir / "peer.onnx").read_text() == "model"
