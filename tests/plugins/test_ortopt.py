"""ortopt: onnxruntime graph optimizations saved offline."""

from __future__ import annotations

import models
import numpy as np
import pytest
from onnx import TensorProto, helper

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.plugins.ortopt import OrtOptimize


def test_registers_through_the_hook(plugins):
    assert "ortopt" in plugins("ortopt").passes


def test_basic_level_is_portable_and_lossless(context, helpers):
    model = models.conv_bn_net()
    result = OrtOptimize().apply(model, context(), OrtOptimize().resolve_options({}))
    assert result.changed and result.notes.startswith("level basic:")
    assert helpers.ops(result.model)["BatchNormalization"] == 0
    assert {n.domain for n in result.model.graph.node} <= {"", "ai.onnx"}
    feed = helpers.feeds(model, 1)[0]
    np.testing.assert_allclose(
        helpers.run(result.model, feed)[0], helpers.run(model, feed)[0], rtol=1e-4, atol=1e-5
    )


def test_extended_level_says_it_needs_onnxruntime_ops(context, helpers):
    model = models.mlp()
    result = OrtOptimize().apply(
        model, context(), OrtOptimize().resolve_options({"level": "extended"})
    )
    assert "needs onnxruntime's own ops (com.microsoft.FusedGemm)" in result.notes
    feed = helpers.feeds(model, 1)[0]
    np.testing.assert_allclose(
        helpers.run(result.model, feed)[0], helpers.run(model, feed)[0], rtol=1e-4, atol=1e-5
    )


def test_nothing_to_optimize_is_reported(context):
    result = OrtOptimize().apply(models.lstm(), context(), OrtOptimize().resolve_options({}))
    assert not result.changed
    assert result.notes == "changed nothing at level basic"


def test_unknown_level_is_an_input_error():
    with pytest.raises(InputError, match="level='fastest' is not one of basic, extended, all"):
        OrtOptimize().resolve_options({"level": "fastest"})


def test_a_model_onnxruntime_cannot_load_is_one_line(context):
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="acme")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("acme", 1)]
    )
    with pytest.raises(
        SlimfleetError, match=r"^ortopt: onnxruntime cannot load the model: "
    ) as err:
        OrtOptimize().apply(model, context(), OrtOptimize().resolve_options({}))
    assert "\n" not in str(err.value)


def test_only_basic_level_is_lossless():
    impl = OrtOptimize()
    assert impl.is_lossless(impl.resolve_options({}))
    assert not impl.is_lossless(impl.resolve_options({"level": "extended"}))
    assert not impl.is_lossless(impl.resolve_options({"level": "all"}))
