"""fp16: float16 inside, float32 at the edges, runnable on onnxruntime's CPU provider."""

from __future__ import annotations

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimfleet.plugins.fp16 import Fp16
from slimfleet.plugins.simplify import Simplify

PASS = Fp16()


def float_io(model: onnx.ModelProto) -> set[int]:
    return {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def test_registers_through_the_hook(plugins):
    assert "fp16" in plugins("fp16").passes


@pytest.mark.parametrize("build", [models.conv_bn_net, models.mlp, models.lstm])
def test_half_size_float32_io_close_outputs(build, context, helpers):
    model = build()
    result = PASS.apply(model, context(), PASS.resolve_options({}))
    assert result.changed
    onnx.checker.check_model(result.model)
    assert float_io(result.model) == {TensorProto.FLOAT}
    weights = [t for t in result.model.graph.initializer if t.data_type in (1, 10)]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert result.model.ByteSize() < model.ByteSize() * 0.6
    for feed in helpers.feeds(model, 3):
        got, want = helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]
        assert got.dtype == np.float32
        assert helpers.cosine(got, want) > 0.999


def test_constant_node_weights_are_converted(context, helpers):
    model = models.constant_weights()
    result = PASS.apply(model, context(), PASS.resolve_options({}))
    assert result.model.ByteSize() < model.ByteSize() * 0.6
    feed = helpers.feeds(model, 1)[0]
    assert helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.999


def test_kept_ops_stay_float32_between_casts(context, helpers):
    model = models.conv_bn_net()
    result = PASS.apply(model, context(), PASS.resolve_options({"keep_ops": "Conv"}))
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert types["w1"] == types["w2"] == TensorProto.FLOAT
    assert types["wf"] == TensorProto.FLOAT16
    assert "2 nodes kept in float32" in result.notes
    feed = helpers.feeds(model, 1)[0]
    assert helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.999


def test_float32_only_inputs_keep_their_type(context, helpers):
    """Resize takes its scales only as float32; the pass must leave them so."""
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Resize", ["c", "", "scales"], ["y"], name="up", mode="nearest"),
        ],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        [
            numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = PASS.apply(model, context(), PASS.resolve_options({}))
    types = {t.name: t.data_type for t in result.model.graph.initializer}
    assert types == {"w": TensorProto.FLOAT16, "scales": TensorProto.FLOAT}
    feed = helpers.feeds(model, 1)[0]
    np.testing.assert_allclose(
        helpers.run(result.model, feed)[0], helpers.run(model, feed)[0], rtol=1e-2, atol=1e-2
    )


def test_overflowing_batchnorm_is_clamped_and_said(context, helpers):
    model = models.conv_bn_net()
    variance = next(t for t in model.graph.initializer if t.name == "bn2_v")
    big = np.full(numpy_helper.to_array(variance).shape, 1e6, np.float32)
    variance.CopyFrom(numpy_helper.from_array(big, "bn2_v"))
    clamped = PASS.apply(model, context(), PASS.resolve_options({}))
    assert "clamped 16 weights beyond ±65504 in bn2_v" in clamped.notes
    simplified = Simplify().apply(model, context(), Simplify().resolve_options({})).model
    folded = PASS.apply(simplified, context(), PASS.resolve_options({}))
    assert "clamped" not in folded.notes
    feed = helpers.feeds(model, 1)[0]
    assert helpers.cosine(helpers.run(folded.model, feed)[0], helpers.run(model, feed)[0]) > 0.999


def test_check_says_why_it_does_not_apply(context):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "no_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert (
        PASS.check(model, context(), PASS.resolve_options({})) == "no float32 weights or constants"
    )
    assert PASS.check(models.mlp(), context(), PASS.resolve_options({})) is None


def test_input_model_is_not_modified(context):
    model = models.lstm()
    before = model.SerializeToString()
    PASS.apply(model, context(), PASS.resolve_options({}))
    assert model.SerializeToString() == before
