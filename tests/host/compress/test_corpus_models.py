"""compress on real pretrained models, one per input kind of issue 6 (skipped when absent).

Each run is restricted to cheap passes (``--passes``) or a small model, so the file
stays within seconds per model; the full default search on every corpus model is the
corpus benchmark's job.
"""

from __future__ import annotations

import json

import corpus
import numpy as np
import pytest

from slimfleet.host.compress.candidate import BASELINE
from slimfleet.host.compress.search import compress

RNG = np.random.default_rng(9)


def _run(tmp_path, quick, name: str, data: dict | None = None, **kwargs):
    model = corpus.require(name)
    if data is not None:
        np.savez(tmp_path / "data.npz", **data)
        kwargs["data"] = tmp_path / "data.npz"
    return compress(model, tmp_path / "out", settings=quick, **kwargs), model


def test_external_data_int64_and_bool_inputs_khmersm(tmp_path, quick):
    data = {
        "x": RNG.integers(1, 100, (8, 1, 12)),  # int64 token ids
        "mask": np.ones((8, 1, 12), bool),
    }
    result, model = _run(tmp_path, quick, "khmersm", data, passes="simplify")
    assert result.candidates[0]["size_bytes"] > model.stat().st_size  # weights beside it
    # two scores per step: a segmenter's tags, judged step by step (not CTC)
    assert result.candidates[0]["fidelity"]["outputs"]["emissions"]["metric"].startswith("steps")
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[0] == "model.onnx"


def test_static_int8_of_a_padded_encoder_keeps_its_mask_float_khmersm(tmp_path, quick):
    """khmersm's attention adds -inf for padded characters: static int8 failed on it
    ("autodetected range of [0.0, inf] is not finite")."""
    lengths = RNG.integers(4, 13, 8)
    data = {
        "x": RNG.integers(1, 100, (8, 1, 12)),
        "mask": (np.arange(12) < lengths[:, None])[:, None],
    }
    result, _ = _run(tmp_path, quick, "khmersm", data, passes="quantize_static")
    static = result.candidates[1]
    assert static["status"] != "failed", static["reason"]
    assert "activations in float: they hold values int8 cannot carry" in json.dumps(static)


def test_static_int8_keeps_a_yolov8_heads_output_float_320n(tmp_path, quick):
    """320n's [1, 22, 2100] head: static int8 rounded its probabilities to 0 under the
    pixels' scale while cosine said 0.9994. On noise it detects nothing, so cosine judges
    it (every candidate that found nothing would agree on detections)."""
    data = {"images": RNG.uniform(0, 1, (4, 1, 3, 320, 320)).astype(np.float32)}
    result, _ = _run(tmp_path, quick, "nudenet_320n", data, passes="quantize_static")
    assert result.candidates[0]["fidelity"]["outputs"]["output0"]["metric"] == "cosine"
    static = result.candidates[1]
    assert static["status"] != "failed", static["reason"]
    assert "join parts whose ranges differ 16x or more" in json.dumps(static)


def test_one_dimensional_state_inputs_madmom(tmp_path, quick):
    states = {
        f"state_{i}_{k}_in": RNG.normal(0, 0.1, (6, 25)).astype(np.float32)
        for i in (1, 2, 4, 5, 7, 8)
        for k in ("hidden", "cell")
    }
    data = {"input": np.abs(RNG.normal(size=(6, 20, 314))).astype(np.float32), **states}
    result, _ = _run(tmp_path, quick, "madmom", data, passes="quantize_dynamic[op_types=LSTM]")
    outputs = result.candidates[0]["fidelity"]["outputs"]
    assert outputs["lstm_hidden_squeeze_1_17"]["metric"] == "cosine"  # state, not classes
    assert result.candidates[1]["status"] != "failed", result.candidates[1]["reason"]


def test_int32_input_and_wide_probabilities_magika(tmp_path, quick):
    data = {"bytes": RNG.integers(0, 256, (6, 1, 2048)).astype(np.int64)}  # int64 -> int32
    result, _ = _run(tmp_path, quick, "magika", data, passes="simplify")
    assert result.candidates[0]["fidelity"]["outputs"]["target_label"]["metric"] == "top1"


def test_ai_onnx_ml_only_logreg_iris(tmp_path, quick):
    result, _ = _run(tmp_path, quick, "logreg_iris", passes="simplify")
    assert list(result.candidates[0]["fidelity"]["outputs"]) == ["label"]
    assert result.candidates[0]["fidelity"]["outputs"]["label"]["metric"] == "exact"


def test_crnn_logits_are_judged_by_decoded_text(tmp_path, quick):
    data = {"image": RNG.random((4, 1, 3, 60, 160)).astype(np.float32)}
    result, _ = _run(tmp_path, quick, "captcha_crnn", data, passes="normalize")
    figures = result.candidates[0]["fidelity"]["outputs"]["logits"]
    assert figures["metric"] == "ctc:blank=0,batch_axis=1"  # [20, batch, 37], time-major
    assert figures["step_agreement"] == 1.0


def test_sentence_embeddings_by_cosine_minilm(tmp_path, quick):
    data = {
        "input_ids": RNG.integers(100, 5000, (4, 1, 10)),
        "attention_mask": np.ones((4, 1, 10), np.int64),
    }
    result, _ = _run(tmp_path, quick, "minilm", data, passes="normalize")
    metrics = {k: v["metric"] for k, v in result.candidates[0]["fidelity"]["outputs"].items()}
    assert metrics["461"] == "cosine" and metrics["onnx::Shape_422"] == "cosine"
    assert metrics["output"] == "exact"


def test_an_already_int8_model_never_comes_back_larger(tmp_path, quick, monkeypatch):
    cwd = tmp_path / "cwd"  # onnxruntime's shape inference fails here and leaves files
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = {"input_ids": RNG.integers(1, 40, (8, 1, 24))}
    result, model = _run(tmp_path, quick, "tashkeel_int8", data)
    out = (tmp_path / "out" / "model.onnx").read_bytes()
    assert len(out) <= model.stat().st_size * 1.01
    if result.summary["kept_original"] and result.summary["candidate"] == 0:
        assert out == model.read_bytes()  # byte for byte
    assert result.candidates[0]["status"] == BASELINE
    assert list(cwd.iterdir()) == []  # the quantizer ran in its scratch folder


@pytest.mark.parametrize("name", sorted(corpus.MODELS))
def test_the_corpus_helper_checks_sha256(name):
    path = corpus.find(name)
    if path is None:
        pytest.skip(f"{name} is not on this machine")
    assert corpus._sha256(path).startswith(corpus.MODELS[name][2])
