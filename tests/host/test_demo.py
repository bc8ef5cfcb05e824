"""``slimfleet demo`` as a user runs it: the console script, an embedded broker, a real agent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _slimfleet() -> list[str]:
    exe = Path(sys.executable).with_name("slimfleet")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "slimfleet.host.cli"]


@pytest.mark.timeout(600)
def test_demo_compresses_delivers_and_serves(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*_slimfleet(), "demo", "--workdir", str(work), "--requests", "50", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["compress"]["size_ratio"] < 0.5  # int8 weights of a dense model
    assert summary["delivery"]["chunks"] >= 1 and summary["delivery"]["swap_ms"] is not None
    assert summary["serving"]["failed"] == 0
    assert summary["serving"]["telemetry"]["requests"] >= 1
    for name in ("model.onnx", "report.json", "report.html", "sample.npz"):
        assert (work / "compressed" / name).is_file()
    assert (work / "agent-store" / "state.json").is_file()


def test_demo_refuses_a_non_empty_workdir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run(
        [*_slimfleet(), "demo", "--workdir", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
