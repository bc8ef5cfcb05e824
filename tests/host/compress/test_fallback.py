from __future__ import annotations

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.calibrate import CalibrationDataReader

from slimfleet.host.compress import fallback

RNG = np.random.default_rng(7)


def _dynamic(model: onnx.ModelProto, tmp_path, exclude=()) -> onnx.ModelProto:
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude)
    )
    return onnx.load(str(dst))


def _runner(samples):
    def run(model: onnx.ModelProto):
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        return [dict(zip(names, session.run(None, s), strict=True)) for s in samples]

    return run


def test_dynamic_quantization_is_detected_per_node(tmp_path):
    model = models.mlp()
    assert fallback.quantized_nodes(model, _dynamic(model, tmp_path)) == ["mm1", "mm2"]
    only_mm1 = _dynamic(model, tmp_path, exclude=["mm2"])
    assert fallback.quantized_nodes(model, only_mm1) == ["mm1"]
    assert fallback.quantized_nodes(model, model) == []


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def test_qdq_quantization_is_detected_per_node(tmp_path):
    model = models.conv_bn_net()
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    feeds = [{"input": RNG.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    quantize_static(str(src), str(dst), _Reader(feeds), op_types_to_quantize=["Conv"])
    quantized = onnx.load(str(dst))
    # The BatchNorms read the Convs' quantized outputs but keep float weights: not listed.
    assert fallback.quantized_nodes(model, quantized) == ["conv1", "conv2"]
    ranked = fallback.rank_nodes(model, quantized, feeds)
    assert {name for name, _ in ranked} == {"conv1", "conv2"}


def test_the_node_that_hurts_most_ranks_first(tmp_path, outlier_mlp):
    model = outlier_mlp
    samples = [{"x": RNG.normal(size=(4, 64)).astype(np.float32)} for _ in range(3)]
    ranked = fallback.rank_nodes(model, _dynamic(model, tmp_path), samples)
    assert [name for name, _ in ranked] == ["mm2", "mm1"]
    assert ranked[0][1] > 5 * ranked[1][1] > 0


def test_keeping_the_top_ranked_node_in_float_recovers_fidelity(tmp_path, outlier_mlp):
    model = outlier_mlp
    samples = [{"x": RNG.normal(size=(4, 64)).astype(np.float32)} for _ in range(3)]
    run = _runner(samples)
    (top, _), _ = fallback.rank_nodes(model, _dynamic(model, tmp_path), samples)
    reference = run(model)

    def error(candidate: onnx.ModelProto) -> float:
        got = run(candidate)
        return max(np.abs(r["y"] - g["y"]).max() for r, g in zip(reference, got, strict=True))

    assert error(_dynamic(model, tmp_path, exclude=[top])) < error(_dynamic(model, tmp_path)) / 5


def test_tiny_batches_give_the_same_ranking_one_tensor_at_a_time(tmp_path, outlier_mlp):
    """A batch limit of 1 byte: every tensor gets its own pair of sessions."""
    samples = [{"x": RNG.normal(size=(4, 64)).astype(np.float32)} for _ in range(3)]
    quantized = _dynamic(outlier_mlp, tmp_path)
    whole = fallback.rank_nodes(outlier_mlp, quantized, samples)
    tiny = fallback.rank_nodes(outlier_mlp, quantized, samples, batch_bytes=1)
    assert [n for n, _ in tiny] == [n for n, _ in whole]
    assert [h for _, h in tiny] == pytest.approx([h for _, h in whole])


def test_rank_files_reads_models_and_samples_from_disk(tmp_path, outlier_mlp):
    from slimfleet.host.compress.evaluate import write_samples

    samples = [{"x": RNG.normal(size=(4, 64)).astype(np.float32)} for _ in range(3)]
    onnx.save(outlier_mlp, str(tmp_path / "f.onnx"))
    onnx.save(_dynamic(outlier_mlp, tmp_path), str(tmp_path / "q.onnx"))
    paths = write_samples(samples, tmp_path / "samples")
    ranked = fallback.rank_files(tmp_path / "f.onnx", tmp_path / "q.onnx", paths, 1, 1 << 20)
    assert [name for name, _ in ranked] == ["mm2", "mm1"]


def test_probe_models_expose_intermediate_tensors():
    probe = fallback.with_outputs(models.mlp(), ["h", "r", "y"])
    assert [o.name for o in probe.graph.output] == ["y", "h", "r"]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (h,) = session.run(["h"], {"x": np.ones((2, 64), np.float32)})
    assert h.shape == (2, 128)


@pytest.mark.parametrize(
    ("count", "sizes"), [(0, []), (1, []), (2, [1]), (5, [1, 2, 4]), (100, [1, 2, 4, 8, 16])]
)
def test_exclusion_sizes_double_below_the_node_count(count, sizes):
    assert fallback.exclusion_sizes(count) == sizes


def test_weights_whose_type_changed_count_as_converted():
    model = models.mlp()
    half = onnx.ModelProto()
    half.CopyFrom(model)
    w1 = next(t for t in half.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1).astype(np.float16), "w1"))
    assert fallback.quantized_nodes(model, half) == ["mm1"]
