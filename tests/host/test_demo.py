"""``slimfleet demo`` as a user runs it: the console script, an embedded broker, three real
agents, twice in the same directory."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _slimfleet() -> list[str]:
    exe = Path(sys.executable).with_name("slimfleet")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "slimfleet.host.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_slimfleet(), "demo", *args], capture_output=True, text=True, timeout=240, cwd=cwd
    )


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end_and_again_in_the_same_directory(tmp_path):
    first = _run(cwd=tmp_path)  # not a terminal: one line per step, default workdir
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    steps = [line for line in out.splitlines() if re.match(r"\d/7 ", line)]
    assert [s[:3] for s in steps] == [f"{i}/7" for i in range(1, 8)]
    assert "chose int8" in out and "Traceback" not in first.stderr
    # the swap under load: both versions answered, nothing failed
    swap = re.search(
        r"(\d+) requests, 0 failed: classify@1 answered (\d+), classify@2 answered (\d+)", out
    )
    assert swap and int(swap[2]) > 0 and int(swap[3]) > 0
    assert int(swap[1]) == int(swap[2]) + int(swap[3])
    # the chain: some requests escalated, most did not
    chain = re.search(r"200 requests, 0 failed: (\d+) answered by classify@2, (\d+) escalated", out)
    assert chain and int(chain[1]) > int(chain[2]) > 0
    assert "written to deployment.yaml by `slimfleet chain calibrate`" in out
    # the rollouts: a good one through both waves, a bad one aborted in its first
    assert "wave 2/2: 2 device(s), 2 serving" in out and "rollout of features@2 on all: done" in out
    assert "rollout of features@3 on all: aborted" in out
    assert "desired_refused seq=" in out and "over the budget of 5 ms" in out
    assert "features@3: aborted in wave 1 (1 device touched); 3 of 3 devices on features@2" in out
    assert out.count("DEVICE  ONLINE") == 2  # the status table, twice
    assert re.search(r"\d+ requests during the rollouts, 0 failed", out)
    assert out.rstrip().splitlines()[-1].startswith("done in ")
    for port in re.findall(r"127\.0\.0\.1:(\d+)", out):  # the broker and edge-1's HTTP API
        with socket.socket() as s:  # SO_REUSEADDR: TIME_WAIT is fine, a listener is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", int(port)))  # free again: nothing is left listening
    work = tmp_path / "slimfleet-demo"
    assert (work / "compressed" / "report.html").is_file()
    assert (work / "store-edge-3" / "state.json").is_file()

    second = _run("--json", cwd=tmp_path)  # its own output is replaced without --force
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["swap"]["failed"] == 0 and summary["chain"]["escalated"] > 0
    assert summary["rollout"]["good"] == "done" and summary["rollout"]["bad"] == "aborted"
    assert summary["rollout"]["back"] == ["edge-1", "edge-2", "edge-3"]
    assert "7/7 " in second.stderr  # progress goes to stderr with --json


def test_demo_refuses_a_directory_it_did_not_write_unless_forced(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = _run("--workdir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not a previous demo's output" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_never_deletes_the_current_directory_even_forced(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = _run("--workdir", ".", "--force", cwd=tmp_path)
    assert proc.returncode == 2 and "not deleting it" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_never_deletes_where_a_symbolic_link_points_even_forced(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    proc = _run("--workdir", "link", "--force", cwd=tmp_path)
    assert proc.returncode == 2 and "is a symbolic link" in proc.stderr
    assert (tmp_path / "real" / "keep.txt").read_text() == "mine"


def test_demo_help():
    proc = subprocess.run([*_slimfleet(), "demo", "-h"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--force" in proc.stdout and "--json" in proc.stdout


def test_the_bad_build_answers_like_the_good_one_only_slower():
    import numpy as np
    import onnxruntime as ort

    from slimfleet.host.demo import models

    reading = models.readings(1, seed=0)[0]
    good = ort.InferenceSession(models.features_model(2).SerializeToString())
    slow = ort.InferenceSession(models.features_model(2, models.SLOW_STEPS).SerializeToString())
    expected = models.features_of(models.features_model(2), reading)
    assert np.allclose(good.run(None, {"x": reading})[0], expected, atol=1e-5)
    assert np.array_equal(slow.run(None, {"x": reading})[0], good.run(None, {"x": reading})[0])
    assert len(slow.get_outputs()) == 1 and slow.get_outputs()[0].name == "f"
