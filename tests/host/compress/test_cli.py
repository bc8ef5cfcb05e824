"""``slimfleet compress``, ``passes`` and ``inspect`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import models
import numpy as np
import pytest
from onnx import TensorProto, helper

RNG = np.random.default_rng(5)
FILES = ["model.onnx", "report.html", "report.json", "sample.npz"]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The temp dir compress uses, to prove nothing is left in it."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_compress_json_summary_and_four_files(slimfleet, mlp_case, tmp_path, scratch):
    model, data = mlp_case
    out = tmp_path / "out"
    args = ["compress", model, "-o", out, "--data", data, "--passes", "normalize,simplify"]
    code, stdout, stderr = slimfleet(*args, "--quick", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert doc["files"]["model.onnx"] == str(out / "model.onnx")
    assert doc["summary"] == json.loads((out / "report.json").read_text())["summary"]
    assert [c["label"] for c in doc["candidates"]] == ["(original)", "normalize > simplify"]
    assert list(scratch.iterdir()) == []


def test_compress_says_plainly_when_it_keeps_the_original(slimfleet, mlp_case, tmp_path):
    model, data = mlp_case
    args = ["compress", model, "-o", tmp_path / "out", "--data", data, "--quick"]
    code, stdout, stderr = slimfleet(*args, "--passes", "prune[sparsity=0.95]")
    assert code == 0, stderr
    assert "Kept the original: nothing beat it inside the budget." in stdout
    assert "chosen: #0 (original)" in stdout
    assert "wrote " in stdout


def test_random_inputs_need_shapes_and_warn(slimfleet, mlp_case, tmp_path):
    model, _ = mlp_case
    args = ["compress", model, "-o", tmp_path / "out", "--quick", "--passes", "normalize"]
    code, _, stderr = slimfleet(*args, "--input-shape", "x:2x64")
    assert code == 0, stderr
    assert "warning: no --data given: candidates are judged on RANDOM inputs" in stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["samples"]["source"] == (
        "random"
    )


def _custom_domain_model():
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], name="mystery", domain="com.acme")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.acme", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _bad_case(case: str, tmp_path: Path, save_model, unrunnable) -> tuple[list, str]:
    """Arguments for one kind of bad input, and the text its error line must contain."""
    good = save_model(models.mlp())
    data = tmp_path / "data.npz"
    out = tmp_path / "out"
    if case == "corrupt model":
        bad = tmp_path / "corrupt.onnx"
        bad.write_bytes(b"\x08\x07garbage" * 100)
        return [bad, "-o", out, "--input-shape", "x:1x64"], "corrupt.onnx: not an ONNX model"
    if case == "missing model":
        return [tmp_path / "nope.onnx", "-o", out], "nope.onnx: no such model file"
    if case == "custom-domain op":
        model = save_model(_custom_domain_model(), "custom.onnx")
        return [model, "-o", out], "uses op 'Frobnicate' from custom domain 'com.acme'"
    if case == "wrong data keys":
        np.savez(data, input=np.zeros((4, 1, 64), np.float32))
        return [good, "-o", out, "--data", data], "keys do not match the model inputs ['x']"
    if case == "wrong data shape":
        np.savez(data, x=np.zeros((4, 1, 65), np.float32))
        return [good, "-o", out, "--data", data], "input 'x' expects float32 batchx64, got"
    if case == "missing dims":
        return [good, "-o", out], "input 'x' has dynamic dims (batchx64)"
    if case == "bad input shape":
        return [good, "-o", out, "--input-shape", "x=1x64"], "expected NAME:DIMxDIM"
    if case == "unknown pass":
        return [good, "-o", out, "--passes", "shrink"], "unknown pass 'shrink'"
    if case == "unwritable outdir":
        (tmp_path / "file").write_text("not a directory")
        args = [good, "-o", tmp_path / "file" / "out", "--input-shape", "x:1x64"]
        return args, "cannot write there"
    if case == "model onnxruntime cannot run":
        model = save_model(unrunnable, "reshape.onnx")
        args = [model, "-o", out, "--passes", "normalize", "--input-shape", "x:1x4"]
        return args, "onnxruntime cannot run the original model"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "corrupt model",
        "missing model",
        "custom-domain op",
        "wrong data keys",
        "wrong data shape",
        "missing dims",
        "bad input shape",
        "unknown pass",
        "unwritable outdir",
        "model onnxruntime cannot run",
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    slimfleet, tmp_path, save_model, scratch, unrunnable, case
):
    args, expected = _bad_case(case, tmp_path, save_model, unrunnable)
    code, stdout, stderr = slimfleet("-q", "compress", *args, "--quick")
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
    assert list(scratch.iterdir()) == []


def test_passes_lists_every_builtin_with_its_plugin(slimfleet):
    code, stdout, _ = slimfleet("passes", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(stdout)}
    expected = {"normalize", "simplify", "ortopt", "quantize_dynamic", "quantize_static"}
    assert expected | {"fp16", "prune"} <= set(rows)
    assert rows["quantize_static"]["plugin"] == "slimfleet.plugins.quantize_static"
    assert "exclude_nodes" in {o["name"] for o in rows["quantize_dynamic"]["options"]}
    code, text, _ = slimfleet("passes")
    assert code == 0
    assert "quantize_dynamic  (slimfleet.plugins.quantize_dynamic)" in text
    assert "recipes searched by default:" in text


def test_inspect_shows_constant_weights(slimfleet, save_model):
    path = save_model(models.constant_weights())
    code, stdout, _ = slimfleet("inspect", path, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["opset"] == 13 and info["ops"]["Constant"] == 4
    assert len(info["constant_weights"]) == 4
    code, text, _ = slimfleet("inspect", path)
    assert "x  float32  batchx64" in text
    assert "weights stored as Constant nodes: 4" in text
    assert "parameters: 9,610 (0 initializers)" in text


def test_inspect_reads_a_model_with_external_data(slimfleet, tmp_path):
    import onnx

    path = tmp_path / "ext.onnx"
    onnx.save(models.mlp(), str(path), save_as_external_data=True, size_threshold=0)
    code, stdout, stderr = slimfleet("inspect", path, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["parameters"] == 64 * 128 + 128 + 128 * 10 + 10


def test_inspect_bad_file(slimfleet, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    code, stdout, stderr = slimfleet("inspect", bad)
    assert (code, stdout) == (2, "")
    assert stderr.startswith("error: ") and "not an ONNX model" in stderr


def test_the_console_script_runs_the_whole_search(tmp_path, save_model):
    """The real ``slimfleet`` executable, every built-in recipe, no data: as a user would."""
    model = save_model(models.conv_bn_net())
    script = Path(sys.executable).with_name("slimfleet")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.run(
        [str(script), "compress", str(model), "-o", str(tmp_path / "out"), "--quick", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == FILES
    assert len(doc["candidates"]) >= 6
    assert doc["summary"]["fidelity"] >= 0.99
    assert "RANDOM inputs" in doc["warnings"][0]
    assert "Traceback" not in proc.stderr
    # .ses: written at interpreter start-up by this machine's sandboxing, not by slimfleet
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == []


def test_sigterm_takes_the_evaluation_worker_down(tmp_path):
    """The worker leads its own session, so a SIGTERM to ``slimfleet`` alone once left it
    running on, reparented, with no time or memory limit."""
    import signal
    import time

    import psutil
    from oip_rig import matmul_chain

    from slimfleet.host.compress.evaluate import WORKER_MODULE

    model = tmp_path / "slow.onnx"
    model.write_bytes(matmul_chain(width=1024, depth=32, rows=256))  # about a second a run
    script = Path(sys.executable).with_name("slimfleet")
    proc = subprocess.Popen(
        [str(script), "compress", str(model), "-o", str(tmp_path / "out"), "--quick"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, workers = time.monotonic() + 60, []
    while not workers and time.monotonic() < deadline and proc.poll() is None:
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if WORKER_MODULE in " ".join(p.cmdline())
        ]
        time.sleep(0.05)
    assert workers, "no evaluation worker started"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143 and stderr.strip().endswith("terminated")
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker {alive[0].pid} outlived slimfleet"
