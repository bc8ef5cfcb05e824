"""compress on every input and graph kind real exporters produce (item 1 of issue 6).

Each test builds a small model with onnx.helper (tests/model_kinds.py), writes data the
way a user would, and runs the real search: onnxruntime in child processes, real passes.
"""

from __future__ import annotations

import json

import model_kinds as kinds
import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import modelfile
from slimfleet.host.compress.candidate import ACCEPTED, BASELINE, FAILED, REJECTED, SKIPPED
from slimfleet.host.compress.search import compress

RNG = np.random.default_rng(5)
STATUSES = {BASELINE, ACCEPTED, REJECTED, FAILED, SKIPPED}


def _save(model: onnx.ModelProto, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def _reasons(result) -> dict[str, str]:
    return {c["label"]: f"{c['status']}: {c['reason']}" for c in result.candidates}


@pytest.mark.parametrize("dynamic", [-1, 0])
def test_minus_one_and_zero_dims_take_any_size(tmp_path, quick, dynamic):
    """Paddle writes -1 for a dynamic dim: 1x3x48x64 data must fit -1x3x-1x-1."""
    model = _save(kinds.paddle_classifier(dynamic), tmp_path / "paddle.onnx")
    np.savez(tmp_path / "d.npz", x=RNG.random((6, 1, 3, 48, 64)).astype(np.float32))
    result = compress(
        model, tmp_path / "out", data=tmp_path / "d.npz", passes="simplify", settings=quick
    )
    assert result.candidates[0]["status"] == BASELINE
    assert result.data["model"]["inputs"][0]["shape"] == ["x_dim0", 3, "x_dim2", "x_dim3"]
    assert result.candidates[0]["fidelity"]["outputs"]["logits"]["metric"] == "top1"


def test_a_scalar_sample_rate_stacked_in_one_npz(tmp_path, quick):
    model = _save(kinds.audio_with_rate(), tmp_path / "vad.onnx")
    np.savez(
        tmp_path / "d.npz",
        audio=RNG.normal(size=(8, 1, 160)).astype(np.float32),
        sr=np.full(8, 16000, np.int64),  # one 0-d value per sample
    )
    result = compress(
        model, tmp_path / "out", data=tmp_path / "d.npz", passes="fp16", settings=quick
    )
    assert result.data["samples"] == {
        "source": str(tmp_path / "d.npz"),
        "calibration": 4,
        "evaluation": 4,
    }
    with np.load(tmp_path / "out" / "sample.npz") as sample:
        assert sample["sr"].shape == () and sample["sr"] == 16000


def test_a_scalar_sample_rate_one_file_per_sample(tmp_path, quick):
    model = _save(kinds.audio_with_rate(), tmp_path / "vad.onnx")
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(4):  # the rate as a plain Python int, the audio without its batch axis
        np.savez(folder / f"{i}.npz", audio=RNG.normal(size=160).astype(np.float32), sr=8000)
    result = compress(model, tmp_path / "out", data=folder, passes="fp16", settings=quick)
    assert result.candidates[1]["status"] in (ACCEPTED, REJECTED)
    assert result.data["samples"]["evaluation"] == 2


def test_int32_int64_bool_and_uint8_inputs_with_random_and_given_data(tmp_path, quick):
    model = _save(kinds.typed_inputs(), tmp_path / "typed.onnx")
    result = compress(model, tmp_path / "random", passes="simplify", settings=quick)
    outputs = result.candidates[0]["fidelity"]["outputs"]
    assert outputs["label"]["metric"] == "exact" and outputs["scores"]["metric"] == "top1"
    given = {  # int64 data for the int32 input, 0/1 ints for bool: converted, values kept
        "i32": RNG.integers(0, 100, (6, 1, 8)),
        "i64": RNG.integers(0, 100, (6, 1, 8)),
        "flag": RNG.integers(0, 2, (6, 1, 8)),
        "pixels": RNG.integers(0, 256, (6, 1, 8)),
    }
    np.savez(tmp_path / "d.npz", **given)
    compress(model, tmp_path / "given", data=tmp_path / "d.npz", passes="simplify", settings=quick)
    with np.load(tmp_path / "given" / "sample.npz") as sample:
        assert {k: sample[k].dtype.name for k in sample.files} == {
            "i32": "int32", "i64": "int64", "flag": "bool", "pixels": "uint8"
        }  # fmt: skip


def test_integers_that_do_not_fit_the_declared_type_are_refused(tmp_path, quick):
    model = _save(kinds.typed_inputs(), tmp_path / "typed.onnx")
    np.savez(
        tmp_path / "d.npz",
        i32=np.zeros((2, 1, 8), np.int64),
        i64=np.zeros((2, 1, 8), np.int64),
        flag=np.full((2, 1, 8), 2),  # 2 is not a bool
        pixels=np.zeros((2, 1, 8), np.uint8),
    )
    with pytest.raises(
        InputError,
        match=r"sample 0: input 'flag' expects bool 1x8, got int64 1x8 \(values 2 to 2 do not fit bool\)",
    ):
        compress(model, tmp_path / "out", data=tmp_path / "d.npz", settings=quick)


def test_state_inputs_and_outputs_come_from_the_data(tmp_path, quick):
    """A streaming GRU: the 1-d state is an ordinary input taken from each sample."""
    model = _save(kinds.streaming_gru(), tmp_path / "gru.onnx")
    np.savez(
        tmp_path / "d.npz",
        frame=RNG.normal(size=(10, 1, 12)).astype(np.float32),
        h_in=RNG.normal(0, 0.5, (10, 16)).astype(np.float32),  # [N, hidden]: one state each
    )
    result = compress(
        model,
        tmp_path / "out",
        data=tmp_path / "d.npz",
        passes="quantize_dynamic[op_types=MatMul]",
        settings=quick,
    )
    original, candidate = result.candidates
    assert set(original["fidelity"]["outputs"]) == {"scores", "h_out"}
    assert original["fidelity"]["outputs"]["h_out"]["metric"] == "cosine"
    assert candidate["status"] in (ACCEPTED, REJECTED), candidate["reason"]


def test_external_data_is_read_and_the_output_is_self_contained(tmp_path, quick):
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(
        models.mlp(),
        str(path),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    result = compress(path, tmp_path / "out", settings=quick, input_shapes={"x": (1, 64)})
    assert result.candidates[0]["size_bytes"] == modelfile.total_size(path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model.onnx", "report.html", "report.json", "sample.npz"
    ]  # fmt: skip
    ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_an_output_past_the_limit_keeps_external_data(tmp_path, quick, monkeypatch):
    monkeypatch.setattr(modelfile, "EXTERNAL_DATA_LIMIT", 10_000)  # stands in for 2 GB
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(
        models.mlp(), str(path), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    compress(path, tmp_path / "out", settings=quick, passes="simplify", input_shapes={"x": (1, 64)})
    out = tmp_path / "out" / "model.onnx"
    assert modelfile.external_files(out) == [tmp_path / "out" / "model.onnx.data"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 64), np.float32)})[0].shape == (1, 10)


def test_a_wrong_declared_output_shape_is_tolerated(tmp_path, quick):
    model = _save(kinds.wrong_output_shape(models.mlp(), [3, 7]), tmp_path / "liar.onnx")
    result = compress(model, tmp_path / "out", settings=quick, input_shapes={"x": (2, 64)})
    assert {c["status"] for c in result.candidates} <= STATUSES - {FAILED}, _reasons(result)


def test_ai_onnx_ml_operators_and_a_seq_map_output(tmp_path, quick):
    model = _save(kinds.ml_classifier(), tmp_path / "sk.onnx")
    result = compress(model, tmp_path / "out", settings=quick, input_shapes={"x": (5, 4)})
    assert list(result.candidates[0]["fidelity"]["outputs"]) == ["label"]
    assert {c["status"] for c in result.candidates} <= STATUSES
    assert result.data["model"]["outputs"][1]["dtype"] == "seq(map(int64,tensor(float32)))"
    assert result.summary["kept_original"]
    steps = [s for c in result.candidates for s in c["steps"]]
    assert all(s["status"] != "failed" for s in steps), _reasons(result)
    assert any(
        s["status"] == "skipped" and s["notes"].startswith("the model has no ai.onnx operators")
        for s in steps
    )


def test_control_flow_never_takes_the_search_down(tmp_path, quick):
    """If and Loop: every pass either handles the subgraphs or says why not."""
    model = _save(kinds.control_flow(), tmp_path / "cf.onnx")
    result = compress(model, tmp_path / "out", settings=quick)
    for c in result.candidates[1:]:
        assert c["status"] in STATUSES and c["reason"], c
        assert "Traceback" not in c["reason"]
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 16), np.float32)})[0].shape == (1, 16)


@pytest.mark.parametrize("opset", [7, 21])
def test_oldest_and_newest_opsets(tmp_path, quick, opset):
    model = _save(models.mlp(opset=opset), tmp_path / f"mlp{opset}.onnx")
    result = compress(model, tmp_path / "out", settings=quick, input_shapes={"x": (1, 64)})
    assert {c["status"] for c in result.candidates} <= STATUSES - {FAILED}, _reasons(result)
    assert all(c["fidelity"]["score"] > 0.9 for c in result.candidates if c["fidelity"])
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["model"]["opset"] == opset


def test_a_string_output_beside_a_numeric_one(tmp_path, quick):
    # onnxruntime returns str objects, which the search's .npz files could only pickle:
    # it was an internal error (exit 70)
    model = _save(kinds.with_string_output(models.mlp()), tmp_path / "labels.onnx")
    np.savez(tmp_path / "d.npz", x=RNG.random((8, 1, 64)).astype(np.float32))
    result = compress(model, tmp_path / "out", data=tmp_path / "d.npz", settings=quick)
    assert result.candidates[0]["status"] == BASELINE
    assert {c["status"] for c in result.candidates} <= STATUSES - {FAILED}, _reasons(result)


@pytest.mark.parametrize(
    ("model", "shapes", "message"),
    [
        (
            kinds.optional_input(),
            {"o": (1, 4)},
            r"input 'o' is of type optional\(tensor\(float32\)\), not a tensor",
        ),
        (
            kinds.declared_input([100_000, 100_000]),
            {},
            r"input 'x' 100000x100000: 16 random samples would take 596.0 GiB \(at most 1 GiB\)",
        ),
        (
            kinds.declared_input([1, 4], onnx.TensorProto.BFLOAT16),
            {},
            "input 'x' is bfloat16: onnxruntime's Python API cannot be fed it",
        ),
        (kinds.declared_input([1, 4], onnx.TensorProto.STRING), {}, "input 'x' holds strings"),
    ],
    ids=["optional", "huge declared dims", "bfloat16", "string"],
)
def test_inputs_that_cannot_be_fed_are_one_line(tmp_path, quick, model, shapes, message):
    # each was an internal error (TypeError, MemoryError) or a dead-end hint before
    path = _save(model, tmp_path / "m.onnx")
    with pytest.raises(InputError, match=message):
        compress(path, tmp_path / "out", settings=quick, input_shapes=shapes)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("values", "dtype", "shown"),
    [
        (np.array([-1], np.int32), "uint32", "values -1 to -1 do not fit uint32"),
        (np.array([255], np.uint8), "int8", "values 255 to 255 do not fit int8"),
        (np.array([-1], np.int64), "uint64", "values -1 to -1 do not fit uint64"),
    ],
)
def test_integers_of_the_wrong_sign_are_refused_not_wrapped(values, dtype, shown):
    """-1 given for a uint32 input once became 4294967295: the cast round-trips."""
    from slimfleet.host.feeds import conform_feed

    spec = [{"name": "x", "dtype": dtype, "shape": [1]}]
    with pytest.raises(InputError, match=shown):
        conform_feed({"x": values}, spec, "d.npz")
    assert conform_feed({"x": np.array([5], np.int64)}, spec, "d.npz")["x"].dtype == dtype
