"""quantize_dynamic: int8 weights via onnxruntime, op types and exclusions respected."""

from __future__ import annotations

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimfleet.agent.errors import InputError
from slimfleet.plugins import quantize_dynamic
from slimfleet.plugins.normalize import Normalize
from slimfleet.plugins.quantize_dynamic import QuantizeDynamic
from slimfleet.plugins.quantize_static import QuantizeStatic

PASS = QuantizeDynamic()


def apply(model, context, **options):
    return PASS.apply(model, context(), PASS.resolve_options(options))


def test_registers_through_the_hook(plugins):
    assert "quantize_dynamic" in plugins("quantize_dynamic").passes


def test_quantizes_matmul_weights(context, helpers):
    model = models.mlp()
    result = apply(model, context)
    assert result.changed
    assert result.notes == "quantized 2 MatMul (dynamic, int8 weights)"
    assert helpers.ops(result.model)["MatMulInteger"] == 2
    assert result.model.ByteSize() < model.ByteSize() * 0.4
    for feed in helpers.feeds(model, 4):
        assert (
            helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.99
        )


def test_respects_op_types(context, helpers):
    model = models.lstm()
    result = apply(model, context, op_types="LSTM")
    counts = helpers.ops(result.model)
    assert counts["DynamicQuantizeLSTM"] == 1 and counts["MatMul"] == 1
    assert result.notes.startswith("quantized 1 LSTM (")
    feed = helpers.feeds(model, 1)[0]
    assert helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.99


def test_gemm_is_quantized_as_matmul_and_conv_left_alone(context, helpers):
    result = apply(models.conv_bn_net(), context, op_types="Gemm", per_channel="true")
    counts = helpers.ops(result.model)
    assert counts["MatMulInteger"] == 1 and counts["ConvInteger"] == 0 and counts["Conv"] == 2
    assert result.notes == "quantized 1 Gemm (dynamic, int8 weights, per channel)"


def test_excluded_nodes_stay_in_float(context, helpers):
    result = apply(models.conv_bn_net(), context, exclude_nodes="conv1+fc+nosuch")
    counts = helpers.ops(result.model)
    assert counts["ConvInteger"] == 1 and counts["Conv"] == 1 and counts["MatMulInteger"] == 0
    assert "quantized 1 Conv" in result.notes
    assert "ignored unknown exclude_nodes nosuch" in result.notes
    assert "kept 2 excluded nodes in float" in result.notes


def test_constant_node_weights_are_reported_not_hidden(context):
    model = models.constant_weights()
    reason = PASS.check(model, context(), PASS.resolve_options({}))
    assert reason == "no MatMul node has its weights in an initializer (run normalize first)"
    result = apply(model, context)
    assert not result.changed
    assert result.notes == (
        "changed nothing: no node got quantized "
        "(weights are Constant nodes, not initializers: run normalize first)"
    )
    assert result.model.SerializeToString() == model.SerializeToString()


def test_normalize_first_makes_constant_weights_quantizable(context, helpers):
    model = (
        Normalize()
        .apply(models.constant_weights(), context(), Normalize().resolve_options({}))
        .model
    )
    assert PASS.check(model, context(), PASS.resolve_options({})) is None
    result = apply(model, context)
    assert result.changed and helpers.ops(result.model)["MatMulInteger"] == 2


def test_check_says_why_it_does_not_apply(context):
    assert (
        PASS.check(models.mlp(), context(), PASS.resolve_options({"op_types": ["LSTM"]}))
        == "no LSTM nodes"
    )
    all_excluded = {"exclude_nodes": ["mm1", "mm2"]}
    assert PASS.check(models.mlp(), context(), PASS.resolve_options(all_excluded)) == (
        "all 2 MatMul nodes are in exclude_nodes"
    )


def test_op_types_are_validated():
    with pytest.raises(InputError, match="op_types='GRU' is not one of"):
        PASS.resolve_options({"op_types": "MatMul+GRU"})


def test_input_model_is_not_modified(context):
    model = models.conv_bn_net()
    before = model.SerializeToString()
    apply(model, context)
    assert model.SerializeToString() == before


def embedding_net() -> onnx.ModelProto:
    """ids [1, 6] -> Gather(table [50, 16]) -> Mul(4.0) -> MatMul -> y [1, 6, 8]: an
    encoder's embedding, scaled before the first layer."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["embedding"], "embed"),
            helper.make_node("Mul", ["embedding", "four"], ["scaled"], "scale"),
            helper.make_node("MatMul", ["scaled", "w"], ["y"], "project"),
        ],
        "embedding_net",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])],
        [
            numpy_helper.from_array(rng.normal(0, 1, (50, 16)).astype(np.float32), "table"),
            numpy_helper.from_array(np.array(4.0, np.float32), "four"),
            numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_after_static_qdq_of_an_embeddings_output_the_gather_still_quantizes(context, helpers):
    """int8_combined on a transformer: the static step puts the embedding's output in QDQ
    (for the Mul), then onnxruntime's dynamic quantizer named its own DequantizeLinear
    after the Gather's output, found the static one of that name and failed an assertion."""
    model = embedding_net()
    ctx = context()
    ctx.calibration = [{"ids": np.arange(i, i + 6, dtype=np.int64)[None]} for i in range(8)]
    static = QuantizeStatic()
    qdq = static.apply(model, ctx, static.resolve_options({"op_types": ["Mul"]})).model
    result = apply(qdq, context, op_types=["MatMul", "Gather"], per_channel=True)
    assert result.notes.startswith("quantized 1 Gather, 1 MatMul")
    for feed in ctx.calibration[:3]:
        want, got = helpers.run(model, feed)[0], helpers.run(result.model, feed)[0]
        assert helpers.cosine(want, got) > 0.999
    names = [n.name for n in result.model.graph.node if n.name]
    assert len(names) == len(set(names))
    again = quantize_dynamic._earlier_qdq_renamed(result.model)  # before a second pass
    names = [n.name for n in again.graph.node if n.name]
    assert len(names) == len(set(names)) and "embedding_DequantizeLinear_earlier2" in names
