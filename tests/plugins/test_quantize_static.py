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


MASKS = [float("-inf"), -1e9, float(np.finfo(np.float32).min), -65504.0, -1e4]
"""PyTorch's masked_fill(-inf), older exports' -1e9, float32's and float16's lowest, and
BERT's / GPT-2's -10000."""


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("mask_value", MASKS)
def test_attention_masks_stay_float_and_the_rest_is_quantized(
    context, helpers, calibration, mask_value
):
    """A padded encoder's mask (-inf, -1e9 or float32's lowest added to the scores): the
    histogram calibrators refused it ("range ... is not finite") and min-max spread one
    8-bit scale over 1e9. The tensors holding it keep no QuantizeLinear; the model stays
    close to float on padded samples."""
    model = models.masked_attention(mask_value)
    ctx = context()
    ctx.calibration = models.attention_feeds(16, seed=1)
    result = PASS.apply(model, ctx, PASS.resolve_options({"calibration": calibration}))
    quantized_inputs = {
        n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"
    }
    assert not quantized_inputs & {"bias", "bias3", "masked"}
    assert {"x", "weights", "normed"} <= quantized_inputs  # the rest is int8 as before
    assert "kept 2 activations in float" in result.notes and "bias3, masked" in result.notes
    used = {name for node in result.model.graph.node for name in node.input}
    assert all(i.name in used for i in result.model.graph.initializer)  # no orphan scales
    held_out = models.attention_feeds(8, seed=2)
    for feed in held_out:
        want = helpers.run(model, feed)[0]
        got = helpers.run(result.model, feed)[0]
        assert np.isfinite(got).all()
        assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_a_model_without_sentinels_keeps_every_quantizer(context):
    model = models.masked_attention(-30.0)  # a mask int8 can carry: quantized like the rest
    ctx = context()
    ctx.calibration = models.attention_feeds(8, seed=1)
    result = PASS.apply(model, ctx, PASS.resolve_options({}))
    assert "float" not in result.notes
    assert "masked" in {
        n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"
    }


def test_a_graph_output_holding_inf_stays_float_under_its_name(context, helpers):
    """Scores of impossible classes at -inf, straight out of the model: onnxruntime renames
    the tensor feeding the output's QuantizeLinear; the float tensor gets the name back."""
    x_info = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    mask_info = onnx.helper.make_tensor_value_info("m", onnx.TensorProto.BOOL, [1, 4])
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Where", ["m", "fill", "x"], ["w"]),
            onnx.helper.make_node("Add", ["w", "x"], ["y"]),
        ],
        "impossible_classes",
        [x_info, mask_info],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(-np.inf, np.float32), "fill")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    mask = np.array([[False, False, True, True]])
    ctx = context()
    ctx.calibration = [
        {"x": rng.normal(size=(1, 4)).astype(np.float32), "m": mask} for _ in range(4)
    ]
    result = PASS.apply(model, ctx, PASS.resolve_options({"op_types": ["Add", "Where"]}))
    assert "kept 2 activations in float" in result.notes and "w, y" in result.notes
    assert [o.name for o in result.model.graph.output] == ["y"]
    got, want = (
        helpers.run(result.model, ctx.calibration[0])[0],
        helpers.run(model, ctx.calibration[0])[0],
    )
    assert np.isneginf(got[0, 2:]).all()
    np.testing.assert_allclose(got[0, :2], want[0, :2], atol=0.02)


def _masked_scores(tail: list, *, constant_mask: bool = False) -> onnx.ModelProto:
    """x [1, 8, 16] -> MatMul -> scores [1, 8, 16] + a mask on the padded columns (-inf
    from the input ``mask`` through Where, or a constant -inf on the last 4 columns),
    then ``tail`` (nodes reading ``masked``, writing ``y``)."""
    rng = np.random.default_rng(0)
    helper = onnx.helper
    if constant_mask:
        fill = np.zeros((1, 1, 16), np.float32)
        fill[..., 12:] = -np.inf
        head = [helper.make_node("Add", ["s", "causal"], ["masked"], "add_mask")]
        extra = [numpy_helper.from_array(fill, "causal")]
    else:
        head = [
            helper.make_node("Not", ["mask"], ["pad"], "not"),
            helper.make_node("Unsqueeze", ["pad", "one"], ["pad3"], "rows"),
            helper.make_node("Where", ["pad3", "fill", "zero"], ["bias"], "masked_fill"),
            helper.make_node("Add", ["s", "bias"], ["masked"], "add_mask"),
        ]
        extra = [
            numpy_helper.from_array(np.array(-np.inf, np.float32), "fill"),
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 16])]
    if not constant_mask:
        inputs.append(helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [1, 16]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["s"], "proj"), *head, *tail],
        "masked_scores",
        inputs,
        [onnx.ValueInfoProto(name="y")],
        [
            numpy_helper.from_array(rng.normal(0, 0.5, (16, 16)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float32), "w2"),
            numpy_helper.from_array(np.array([0], np.int64), "zero_i"),
            numpy_helper.from_array(np.array([8], np.int64), "eight"),
            numpy_helper.from_array(np.array([2], np.int64), "last"),
            *extra,
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _score_feeds(count: int, seed: int, with_mask: bool = True):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {"x": rng.normal(0, 1, (1, 8, 16)).astype(np.float32)}
        if with_mask:
            feed["mask"] = (np.arange(16) < rng.integers(9, 16))[None]
        feeds.append(feed)
    return feeds


SLICE_HEAD = [  # the first 8 columns, always real: a Slice shares its input's scale
    onnx.helper.make_node("Slice", ["masked", "zero_i", "eight", "last"], ["first"], "slice"),
    onnx.helper.make_node("MatMul", ["first", "w2"], ["y"], "head"),
]


@pytest.mark.parametrize("calibration", ["minmax", "percentile"])
def test_an_op_sharing_a_masked_tensors_scale_gets_its_real_range(context, helpers, calibration):
    """The Slice of the real columns shares the masked scores' quantization parameters;
    they come from the scores' real values, not from the zeros the mask was replaced by."""
    model = _masked_scores(SLICE_HEAD)
    ctx = context()
    ctx.calibration = _score_feeds(16, seed=1)
    result = PASS.apply(model, ctx, PASS.resolve_options({"calibration": calibration}))
    assert "masked" in result.notes
    for feed in _score_feeds(6, seed=2):
        want, got = helpers.run(model, feed)[0], helpers.run(result.model, feed)[0]
        assert helpers.cosine(want, got) > 0.995  # was 0.42-0.73: the Slice clipped at 0


def test_a_node_reading_a_constant_mask_stays_float(context, helpers):
    """A causal mask stored as a constant with -inf: quantized as a weight it got an
    infinite scale and the model output zeros."""
    tail = [
        onnx.helper.make_node("Softmax", ["masked"], ["weights"], "softmax", axis=-1),
        onnx.helper.make_node("Slice", ["weights", "zero_i", "eight", "last"], ["first"]),
        onnx.helper.make_node("MatMul", ["first", "w2"], ["y"], "head"),
    ]
    model = _masked_scores(tail, constant_mask=True)
    ctx = context()
    ctx.calibration = _score_feeds(16, seed=1, with_mask=False)
    result = PASS.apply(model, ctx, PASS.resolve_options({}))
    assert "left 1 nodes reading a constant mask in float" in result.notes
    assert "add_mask" in result.notes
    for feed in _score_feeds(6, seed=2, with_mask=False):
        want, got = helpers.run(model, feed)[0], helpers.run(result.model, feed)[0]
        assert helpers.cosine(want, got) > 0.995  # was all zeros
