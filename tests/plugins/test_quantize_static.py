"""quantize_static: QDQ int8 calibrated on the context's samples."""

from __future__ import annotations

import models
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slimfleet.host.compress.tensorsizes import activation_bytes
from slimfleet.plugins import quantize_static
from slimfleet.plugins.normalize import upgrade_opset
from slimfleet.plugins.quantize_static import QuantizeStatic

PASS = QuantizeStatic()


def weights_read_through_dequantize(model: onnx.ModelProto) -> set[str]:
    """Names of nodes whose weight (input 1) comes from DequantizeLinear of an int8 tensor."""
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dequantized = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in int8
    }
    return {n.name for n in model.graph.node if len(n.input) > 1 and n.input[1] in dequantized}


def test_registers_through_the_hook(plugins):
    assert "quantize_static" in plugins("quantize_static").passes


def test_quantizes_convs_to_qdq_per_channel(context, helpers):
    model = models.conv_bn_net()
    ctx = context(model)
    assert PASS.check(model, ctx, PASS.resolve_options({})) is None
    result = PASS.apply(model, ctx, PASS.resolve_options({}))
    assert result.changed
    assert result.notes.startswith("quantized ")
    assert "2 Conv" in result.notes and "1 Gemm" in result.notes
    assert (
        "(QDQ, per-channel int8 weights, uint8 activations, minmax on 16 samples)" in result.notes
    )
    assert {"conv1", "conv2", "fc"} <= weights_read_through_dequantize(result.model)
    per_axis = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear"]
    assert any(a.name == "axis" for n in per_axis for a in n.attribute)
    assert list(ctx.workdir.iterdir()) == []  # scratch files are gone
    for feed in helpers.feeds(model, 4, seed=7):
        assert (
            helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.98
        )


def test_per_channel_needs_opset_13(context, helpers):
    model = models.conv_bn_net(opset=12)
    ctx = context(model)
    assert PASS.min_opset({"per_channel": True}) == 13
    assert PASS.min_opset({"per_channel": False}) == 10
    assert (
        PASS.check(model, ctx, PASS.resolve_options({}))
        == "per-channel QDQ needs opset 13, the model has 12"
    )
    assert PASS.check(model, ctx, PASS.resolve_options({"per_channel": False})) is None
    upgraded = upgrade_opset(model, PASS.min_opset(PASS.resolve_options({})))
    result = PASS.apply(upgraded, ctx, PASS.resolve_options({}))
    feed = helpers.feeds(model, 1, seed=7)[0]
    assert helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.98


def test_needs_calibration_data(context):
    assert (
        PASS.check(models.conv_bn_net(), context(), PASS.resolve_options({}))
        == "needs calibration data"
    )


def test_respects_op_types_and_exclusions(context, helpers):
    model = models.conv_bn_net()
    options = PASS.resolve_options({"op_types": "Conv", "exclude_nodes": "conv1"})
    result = PASS.apply(model, context(model), options)
    assert weights_read_through_dequantize(result.model) == {"conv2"}
    assert "kept 1 excluded nodes in float" in result.notes
    assert PASS.check(
        models.mlp(), context(models.mlp()), PASS.resolve_options({"op_types": ["Conv"]})
    ) == ("no Conv nodes")


def test_other_calibration_methods_and_types(context, helpers):
    model = models.mlp()
    options = PASS.resolve_options(
        {"calibration": "entropy", "activation_type": "int8", "per_channel": "no"}
    )
    result = PASS.apply(model, context(model), options)
    assert "(QDQ, int8 weights, int8 activations, entropy on 16 samples)" in result.notes
    feed = helpers.feeds(model, 1, seed=7)[0]
    assert helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.95


def test_percentile_calibration_takes_its_percentile(context, helpers):
    model = models.conv_bn_net()
    options = PASS.resolve_options({"calibration": "percentile", "percentile": "99.9"})
    result = PASS.apply(model, context(model), options)
    assert "percentile 99.9 on 16 samples" in result.notes
    feed = helpers.feeds(model, 1, seed=7)[0]
    assert helpers.cosine(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0]) > 0.95
    assert (
        PASS.check(model, context(model), PASS.resolve_options({"percentile": 0}))
        == "percentile 0.0 is not in (0, 100]"
    )


def test_mac_share_leaves_the_light_convs_in_float(context):
    model = models.conv_bn_net()  # conv2 does 84% of the convolutions' arithmetic
    options = PASS.resolve_options({"op_types": "Conv", "mac_share": 0.5})
    result = PASS.apply(model, context(model), options)
    assert weights_read_through_dequantize(result.model) == {"conv2"}
    assert "left the 1 lightest weighted nodes in float (1 Conv; 16% of their" in result.notes
    assert (
        PASS.check(model, context(model), PASS.resolve_options({"mac_share": 0}))
        == "mac_share 0.0 is not in (0, 1]"
    )


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])
def test_calibrating_in_chunks_gives_the_same_model(context, calibration):
    """A memory limit so small that every sample is its own chunk: the same ranges (exactly
    for min/max; histograms are re-binned as their range grows, within 0.5%)."""
    model = models.conv_bn_net()
    options = PASS.resolve_options({"calibration": calibration})
    whole = PASS.apply(model, context(model), options)
    small = context(model)
    small.memory = 1
    assert quantize_static.chunk_size(model, small.calibration, small.memory) == 1
    chunked = PASS.apply(model, small, options)
    assert "calibrated in chunks of 1 samples to bound memory" in chunked.notes
    scales = [_scales(whole.model), _scales(chunked.model)]
    assert scales[0].keys() == scales[1].keys()
    for name, value in scales[0].items():
        np.testing.assert_allclose(
            scales[1][name], value, rtol=0 if calibration == "minmax" else 5e-3
        )


def _scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if "scale" in t.name}


def test_chunk_size_fits_a_quarter_of_the_memory(context):
    model = models.conv_bn_net()
    ctx = context(model, samples=40)
    per_sample = activation_bytes(model, ctx.calibration[0])
    assert quantize_static.chunk_size(model, ctx.calibration, 4 * 5 * per_sample) == 5
    assert quantize_static.chunk_size(model, ctx.calibration, None) == 40
