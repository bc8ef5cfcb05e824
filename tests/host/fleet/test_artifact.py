"""Reading what gets published: io signature, opset, report summary, smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from slimfleet.agent.errors import InputError
from slimfleet.host.fleet.artifact import (
    SMOKE_ATOL_FRACTION,
    load_artifact,
    make_smoke,
    random_inputs,
)


def test_outdir_brings_summary_and_sample(outdir: Path) -> None:
    artifact = load_artifact(outdir)
    assert artifact.data == (outdir / "model.onnx").read_bytes()
    assert artifact.report == json.loads((outdir / "report.json").read_text())["summary"]
    assert artifact.opset == 13
    assert artifact.sample is not None and artifact.sample["input"].shape == (1, 3, 32, 32)


def test_io_signature_keeps_symbolic_dims_and_skips_initializer_inputs(tmp_path: Path) -> None:
    model = models.mlp(opset=17)
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [64, 128]))
    artifact = load_artifact(models.save(model, tmp_path / "m.onnx"))
    assert artifact.io == {
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 10]}],
    }
    assert artifact.opset == 17
    lstm = load_artifact(models.save(models.lstm(), tmp_path / "l.onnx"))
    assert lstm.io["inputs"] == [{"name": "seq", "dtype": "float32", "shape": [8, 1, 16]}]


def test_random_inputs_follow_the_signature() -> None:
    io = {
        "inputs": [
            {"name": "img", "dtype": "float16", "shape": [None, 3, "h", 4]},
            {"name": "ids", "dtype": "int64", "shape": [2]},
            {"name": "mask", "dtype": "bool", "shape": []},
        ]
    }
    feeds = random_inputs(io, seed=0)
    assert feeds["img"].shape == (1, 3, 1, 4) and feeds["img"].dtype == np.float16
    assert np.all((feeds["img"] >= 0) & (feeds["img"] < 1))
    assert feeds["ids"].dtype == np.int64 and not feeds["ids"].any()
    assert feeds["mask"].shape == () and feeds["mask"].dtype == np.bool_
    with pytest.raises(InputError, match=r"publish a directory with sample.npz"):
        random_inputs({"inputs": [{"name": "s", "dtype": "object", "shape": [1]}]})


def test_smoke_outputs_are_the_models_own_with_a_scaled_tolerance(outdir: Path) -> None:
    artifact = load_artifact(outdir)
    smoke = make_smoke(artifact, max_latency_ms=50)
    session = ort.InferenceSession(artifact.data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": artifact.sample["input"]})
    np.testing.assert_array_equal(smoke.outputs["logits"], logits)
    assert smoke.atol == pytest.approx(SMOKE_ATOL_FRACTION * float(np.abs(logits).max()))
    assert smoke.max_latency_ms == 50
    # a different model (the conv net with other weights) falls outside the tolerance
    other = models.conv_bn_net(seed=1)
    other_logits = ort.InferenceSession(
        other.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"input": artifact.sample["input"]})[0]
    assert not np.allclose(other_logits, smoke.outputs["logits"], smoke.rtol, smoke.atol)


def test_smoke_input_that_yields_nan_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    out = tmp_path / "out"
    models.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), out / "model.onnx"
    )
    np.savez(out / "sample.npz", x=-np.ones((1, 4), np.float32))
    with pytest.raises(InputError, match="output 'y' has NaN or inf on the smoke input"):
        make_smoke(load_artifact(out))


def write_outdir(tmp_path: Path, **files: bytes) -> Path:
    out = tmp_path / "bad"
    models.save(models.add_one(), out / "model.onnx")
    for name, data in files.items():
        (out / name.replace("_", ".")).write_bytes(data)
    return out


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"report_json": b"{"}, "report.json: cannot read the report"),
        ({"report_json": b'{"candidates": []}'}, "report.json: has no top-level 'summary'"),
        ({"sample_npz": b"not a zip"}, "sample.npz: not a readable .npz"),
    ],
)
def test_bad_outdir_files_are_named(tmp_path: Path, files: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_artifact(write_outdir(tmp_path, **files))


def test_sample_must_match_the_inputs(tmp_path: Path) -> None:
    out = write_outdir(tmp_path)
    np.savez(out / "sample.npz", z=np.zeros((1, 4), np.float32))
    with pytest.raises(InputError, match=r"has arrays \['z'\], the model's inputs are \['x'\]"):
        load_artifact(out)
    np.savez(out / "sample.npz", x=np.zeros((1, 4), np.int32))
    with pytest.raises(InputError, match="does not run on its smoke input"):
        make_smoke(load_artifact(out))


def test_outdir_without_report_or_sample_uses_defaults(tmp_path: Path) -> None:
    artifact = load_artifact(write_outdir(tmp_path))
    assert artifact.report == {} and artifact.sample is None
    assert make_smoke(artifact).inputs["x"].shape == (1, 4)


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match=r"junk.onnx: not an ONNX model"):
        load_artifact(tmp_path / "junk.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no model.onnx in this directory"):
        load_artifact(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file or directory"):
        load_artifact(tmp_path / "absent.onnx")


def test_external_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        models.add_const(1.0, size=4096),
        str(path),
        save_as_external_data=True,
        location="ext.bin",
        size_threshold=0,
    )
    with pytest.raises(InputError, match="external data files"):
        load_artifact(path)


def test_something_that_is_neither_a_file_nor_an_outdir_says_so() -> None:
    with pytest.raises(InputError, match="/dev/null: not a regular file or a compress output"):
        load_artifact(Path("/dev/null"))
