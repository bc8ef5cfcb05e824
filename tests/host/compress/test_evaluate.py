from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import replace

import models
import numpy as np
import onnx
import psutil
import pytest

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host import metrics as metrics_contract
from slimfleet.host.compress import evaluate, fidelity
from slimfleet.host.compress.evaluate import EvalSettings, measure, write_samples
from slimfleet.host.metrics import Metric
from slimfleet.host.registry import Registry

RNG = np.random.default_rng(3)


@pytest.fixture
def conv_samples(tmp_path):
    feeds = [{"input": RNG.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(3)]
    return feeds, write_samples(feeds, tmp_path / "samples")


def test_measure_reports_outputs_latency_memory_and_load_time(save_model, conv_samples, tmp_path):
    paths = conv_samples[1]
    settings = EvalSettings(warmup=1, min_repeats=5, max_repeats=5, latency_seconds=0)
    result = measure(save_model(models.conv_bn_net()), paths, settings, tmp_path / "work")
    assert result.error is None
    assert result.latency_ms["runs"] == 5
    assert 0 < result.latency_ms["median"] <= result.latency_ms["p90"]
    assert result.load_ms > 0 and result.peak_memory_bytes > 0
    assert len(result.outputs) == 3 and result.outputs[0]["logits"].shape == (1, 10)
    assert "outputs" not in result.figures()


def test_outputs_match_an_in_process_session(save_model, conv_samples, tmp_path, quick):
    import onnxruntime as ort

    feeds, paths = conv_samples
    path = save_model(models.conv_bn_net())
    result = measure(path, paths, quick, tmp_path / "work", latency=False)
    assert result.latency_ms == {}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feed, got in zip(feeds, result.outputs, strict=True):
        np.testing.assert_allclose(got["logits"], session.run(None, feed)[0], rtol=1e-5)


def test_a_model_that_fails_to_load_is_an_error_not_an_exception(tmp_path, conv_samples, quick):
    model = models.conv_bn_net()
    model.graph.node[0].input[1] = "no_such_weight"
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    result = measure(path, conv_samples[1], quick, tmp_path / "work")
    assert result.error is not None and "no_such_weight" in result.error
    assert "\n" not in result.error


def test_a_timeout_is_an_error(save_model, conv_samples, tmp_path):
    settings = EvalSettings(timeout=0.05)
    result = measure(save_model(models.conv_bn_net()), conv_samples[1], settings, tmp_path / "w")
    assert result.error == "timed out after 0.05 s"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_crashing_evaluation_process_is_an_error(save_model, conv_samples, tmp_path):
    """Kill the real child with SIGSEGV while it times runs: the caller gets a reason."""
    settings = EvalSettings(min_repeats=10**6, max_repeats=10**6, latency_seconds=60)
    path = save_model(models.conv_bn_net())
    results = []
    worker = threading.Thread(
        target=lambda: results.append(measure(path, conv_samples[1], settings, tmp_path / "w"))
    )
    worker.start()
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and not (tmp_path / "w" / "outputs" / "sample-0002.npz").exists()
    ):
        time.sleep(0.05)  # outputs are written before timing starts
    children = [
        p for p in psutil.Process().children() if evaluate.WORKER_MODULE in " ".join(p.cmdline())
    ]
    assert len(children) == 1
    children[0].send_signal(signal.SIGSEGV)
    worker.join(30)
    assert results[0].error == "crashed: SIGSEGV"


def test_a_candidate_far_slower_than_allowed_is_given_up(save_model, conv_samples, tmp_path):
    settings = replace(EvalSettings.quick(), give_up_ms=1e-6)
    result = measure(save_model(models.conv_bn_net()), conv_samples[1], settings, tmp_path / "w")
    assert result.error.startswith(evaluate.TOO_SLOW + ": two runs took ")
    assert result.error.endswith("a run may take (stopped early)")


def test_an_evaluation_over_its_memory_limit_is_killed(save_model, conv_samples, tmp_path):
    settings = replace(EvalSettings.quick(), memory=20 << 20)  # python + onnxruntime alone: more
    result = measure(save_model(models.conv_bn_net()), conv_samples[1], settings, tmp_path / "w")
    assert result.error is not None and result.error.startswith("killed at ")
    assert result.error.endswith("(limit 20.0 MiB)")


# -- plugin task metrics ---------------------------------------------------------------------------


def _documented_ctc_plugin() -> dict:
    """Run the CTC metric example from the Metric contract's docstring, as documented."""
    doc = metrics_contract.__doc__
    block = doc[doc.index("::\n") + 3 : doc.index("Every candidate then gets")]
    namespace: dict = {}
    exec(compile(block.replace("\n    ", "\n"), "ctc_example", "exec"), namespace)
    return namespace


def test_the_documented_ctc_metric_decodes_and_compares():
    plugin = _documented_ctc_plugin()
    metrics: Registry[Metric] = Registry("metric")
    plugin["slimfleet_add_metrics"](metrics=metrics)
    blank, a, b = np.eye(3, dtype=np.float32)
    text_ab = _outs(logits=np.stack([a, a, blank, b, b])[:, None])  # "a a _ b b" -> [1, 2]
    text_aab = _outs(logits=np.stack([a, blank, a, b, b])[:, None])  # -> [1, 1, 2]
    assert plugin["ctc_decode"](text_ab["logits"]) == [1, 2]
    assert plugin["ctc_decode"](text_aab["logits"]) == [1, 1, 2]
    scores = fidelity.score_metrics(metrics, [text_ab, text_ab], [text_ab, text_aab])
    assert scores == {"ctc_text": 0.5}


def test_a_metric_that_raises_names_itself():
    broken = Metric("broken", "always fails", lambda ref, got: 1 / 0)
    with pytest.raises(SlimfleetError, match="task metric 'broken' raised ZeroDivisionError"):
        fidelity.score_metrics([broken], [], [])


def test_a_nan_metric_counts_as_zero():
    assert fidelity.score_metrics([Metric("n", "nan", lambda r, c: float("nan"))], [], []) == {
        "n": 0.0
    }


def _outs(**arrays: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in arrays.items()}


def test_only_tensor_outputs_are_fetched(save_model, tmp_path, quick):
    """A scikit-learn style model: a tensor label and a seq(map) output; only the label."""
    from onnx import TensorProto, helper

    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, []))
    )
    graph = helper.make_graph(
        [
            helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0),
            helper.make_node(
                "ZipMap", ["x"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]
            ),
        ],
        "zipmap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
            helper.make_value_info("probabilities", seq_map),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)]
    )
    model.ir_version = 8
    paths = write_samples([{"x": np.array([[0.2, 0.8]], np.float32)}], tmp_path / "s")
    result = measure(save_model(model), paths, quick, tmp_path / "work")
    assert result.error is None
    assert list(result.outputs[0]) == ["label"] and result.outputs[0]["label"].tolist() == [1]
