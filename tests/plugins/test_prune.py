"""prune: magnitude pruning, unstructured and by Conv output channel."""

from __future__ import annotations

import models
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimfleet.plugins.prune import Prune

PASS = Prune()


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_registers_through_the_hook(plugins):
    assert "prune" in plugins("prune").passes


def test_unstructured_reaches_the_sparsity(context, helpers):
    model = models.mlp()
    result = PASS.apply(model, context(), PASS.resolve_options({"sparsity": "0.3"}))
    assert result.changed
    pruned = weights(result.model)
    for name in ("w1", "w2"):
        assert np.mean(pruned[name] == 0) >= 0.3
    assert np.count_nonzero(pruned["b1"] == 0) == 0  # biases are not weights
    assert result.notes.startswith("zeroed 30.0% of 9472 weights in 2 tensors")
    feed = helpers.feeds(model, 1)[0]
    assert helpers.run(result.model, feed)[0].shape == helpers.run(model, feed)[0].shape


def test_channels_shrink_convs_and_everything_downstream(context, helpers):
    model = models.conv_bn_net()
    options = PASS.resolve_options({"mode": "channels", "sparsity": 0.25})
    result = PASS.apply(model, context(), PASS.resolve_options(options))
    onnx.checker.check_model(result.model, full_check=True)
    shapes = {name: array.shape for name, array in weights(result.model).items()}
    assert shapes["w1"] == (12, 3, 3, 3) and shapes["b1"] == (12,)
    assert shapes["bn1_s"] == shapes["bn1_v"] == (12,)
    assert shapes["w2"] == (12, 12, 3, 3) and shapes["bn2_m"] == (12,)
    assert shapes["wf"] == (10, 12)
    assert result.notes == "removed 8 of 32 output channels in 2 Conv: conv1 16->12, conv2 16->12"
    feed = helpers.feeds(model, 1)[0]
    assert helpers.run(result.model, feed)[0].shape == (1, 10)


def test_channels_left_alone_where_shapes_do_not_allow(context):
    """A Conv feeding a graph output or a Concat cannot lose channels."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "wa"], ["a"], name="ca"),
            helper.make_node("Conv", ["x", "wb"], ["b"], name="cb"),
            helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1),
        ],
        "concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4, 4]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 8, 4, 4]),
        ],
        [
            numpy_helper.from_array(rng.normal(size=(8, 2, 1, 1)).astype(np.float32), name)
            for name in ("wa", "wb")
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = PASS.apply(model, context(), PASS.resolve_options({"mode": "channels"}))
    assert not result.changed
    assert result.notes == (
        "changed nothing: left 2 Conv as they were: ca (a is a graph output), "
        "cb (output reaches Concat cat)"
    )


def test_check_says_why_it_does_not_apply(context):
    assert PASS.check(models.mlp(), context(), PASS.resolve_options({"mode": "channels"})) == (
        "no Conv node with its weights in an initializer"
    )
    assert PASS.check(models.constant_weights(), context(), PASS.resolve_options({})) == (
        "no MatMul, Gemm or Conv node with its weights in an initializer"
    )
    assert PASS.check(models.mlp(), context(), PASS.resolve_options({"sparsity": 1.5})) == (
        "sparsity 1.5 is not between 0 and 1"
    )
