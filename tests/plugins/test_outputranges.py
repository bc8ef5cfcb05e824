"""A detector head's Concat of pixels and probabilities stays float under static int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimfleet.host.compress.detections import detections, matched
from slimfleet.plugins import quantize_static
from slimfleet.plugins.outputranges import mixed_output_tails
from tests import models

PASS = quantize_static.QuantizeStatic()


def _quantized(context, model, *, rule: bool, monkeypatch):
    if not rule:
        monkeypatch.setattr(quantize_static, "mixed_output_tails", lambda model: [])
    ctx = context()
    ctx.calibration = models.image_feeds(16, seed=1)
    return PASS.apply(model, ctx, PASS.resolve_options({}))


def _agreement(helpers, model, quantized) -> tuple[float, float]:
    """Share of fp32's boxes the quantized model still detects, and the worst probability
    error, on held-out images (about 10 boxes each, many near the 0.25 threshold)."""
    kept = total = 0
    error = 0.0
    for feed in models.image_feeds(24, seed=2):
        want, got = helpers.run(model, feed)[0][0], helpers.run(quantized, feed)[0][0]
        if want.shape[0] > want.shape[1]:
            want, got = want.T, got.T
        error = max(error, float(np.abs(want[4:] - got[4:]).max()))
        boxes = detections(want, 0.25, 0.7)
        kept += matched(boxes, detections(got, 0.25, 0.7), 0.5)
        total += len(boxes)
    return kept / total, error


@pytest.mark.parametrize("tail", ["none", "transpose"])
def test_a_detector_heads_output_concat_stays_float(context, helpers, monkeypatch, tail):
    """One scale for pixels (0-320) and probabilities (0-1) rounds every probability to a
    multiple of 1.25: the detections go, while the output's cosine stays near 1."""
    model = models.detector_head(tail)
    result = _quantized(context, model, rule=True, monkeypatch=monkeypatch)
    assert "kept" in result.notes and "join parts whose ranges differ" in result.notes
    quantized_inputs = {
        n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"
    }
    assert {"x", "r", "cls_flat"} <= quantized_inputs  # the convolutions stay int8
    assert not {"boxes", "scores"} & quantized_inputs  # the parts only the Concat read
    assert result.model.graph.output[0].name == model.graph.output[0].name
    score, error = _agreement(helpers, model, result.model)
    assert error < 0.02
    assert score >= 0.9

    before = _quantized(context, model, rule=False, monkeypatch=monkeypatch)
    lost, lost_error = _agreement(helpers, model, before.model)
    assert lost_error > 0.3  # what the rule prevents: probabilities on a 1.25 grid
    assert lost < 0.6  # only boxes above 0.625 survive, at 1.25


def test_parts_of_one_range_keep_their_quantizers(context, helpers, monkeypatch):
    model = models.detector_head()
    for node in model.graph.node:  # boxes as unit fractions: the same range as the scores
        if node.name == "box_pixels":
            node.input[1] = "one_pixel"
    model.graph.initializer.append(models._init("one_pixel", np.array(1.0)))
    result = _quantized(context, model, rule=False, monkeypatch=monkeypatch)
    assert mixed_output_tails(result.model) == []
    monkeypatch.undo()
    result = _quantized(context, model, rule=True, monkeypatch=monkeypatch)
    assert "join parts" not in result.notes
    assert "head" in {
        n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"
    } | {n.output[0] for n in result.model.graph.node if n.op_type == "DequantizeLinear"}


def test_only_the_tail_below_the_concat_stays_float(context, monkeypatch):
    """Boxes straight from a Conv through a Reshape: onnxruntime gives the Reshape its
    input's scale, and keeping the Reshape float took the Conv's output with it."""
    model = models.detector_head()
    for node in model.graph.node:
        if node.name == "head_concat":
            node.input[0] = "box_flat"
    for init in model.graph.initializer:
        if init.name == "wbox":
            init.CopyFrom(models._init("wbox", np.full((4, 8, 1, 1), 40.0)))
    result = _quantized(context, model, rule=True, monkeypatch=monkeypatch)
    # the output, and the scores only the Concat reads; box_flat's copy also feeds the
    # (now unused) box Sigmoid, and the Conv keeps its quantized output
    assert "kept 2 output tensors in float" in result.notes and "head, scores" in result.notes
    quantized_inputs = {
        n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"
    }
    assert {"box_raw", "cls_flat"} <= quantized_inputs


def test_a_part_a_convolution_makes_keeps_its_quantizer(context, monkeypatch):
    """Its integer kernel (QLinearConv) needs the output's QuantizeLinear; a Sigmoid's
    part goes float."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["boxes"], "box_conv"),
        helper.make_node("Conv", ["x", "wc"], ["logits"], "cls_conv"),
        helper.make_node("Sigmoid", ["logits"], ["scores"], "cls_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["head"], "head_concat", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_parts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, [1, 7, 64])],
        [
            models._init("wb", rng.normal(0, 40, (4, 8, 1))),
            models._init("wc", rng.normal(0, 1, (3, 8, 1))),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    ctx = context()
    ctx.calibration = [{"x": rng.normal(size=(1, 8, 64)).astype(np.float32)} for _ in range(8)]
    result = PASS.apply(model, ctx, PASS.resolve_options({}))
    assert "head, scores" in result.notes
    quantized = {n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"}
    assert "boxes" in quantized and "scores" not in quantized
