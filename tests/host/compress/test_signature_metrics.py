"""Metrics read from the model's signature: a segmenter's per-pixel class scores are
judged by the IoU of its label maps; a model reading tokens is judged step by step."""

from __future__ import annotations

import numpy as np
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import metricdetection, search
from slimfleet.host.compress.fidelity import compare, label_map_iou
from slimfleet.host.compress.metricspec import MetricSpec, parse_metric
from tests import models

RNG = np.random.default_rng(4)


def signature(image, out, dtype="float32"):
    return {
        "inputs": [{"name": "x", "dtype": "float32", "shape": image}],
        "outputs": [{"name": "y", "dtype": dtype, "shape": out}],
    }


@pytest.mark.parametrize(
    ("image", "out", "axis"),
    [
        ([1, 3, 512, 512], [1, 21, 512, 512], 1),  # DeepLab's VOC logits
        ([1, 512, 512, 3], [1, 512, 512, 21], 3),  # the same from TensorFlow
        (["n", 3, "h", "w"], ["n", 19, "h", "w"], 1),  # dynamic, the same dim names
        ([1, 3, 320, 320], [1, 1, 320, 320], None),  # u2net's matte: one channel
        ([1, 3, 256, 256], [1, 3, 256, 256], None),  # an image made from an image
        ([1, 3, 512, 512], [1, 21, 128, 128], None),  # a quarter resolution: by --metric
        ([1, 3, None, None], [1, 21, None, None], None),  # unknown sizes tell nothing
        ([1, 3, 64, 64], [1, 64, 64, 64], 1),  # 64 classes: as many as the pixels across
        ([1, 1, 96, 96], [1, 4, 96, 96], 1),  # a gray scan's 4 tissue classes
        ([1, 4, 6, 6], [1, 8, 6, 6], None),  # a 4-channel input: features, RGBA, depth
    ],
)
def test_label_map_outputs_lie_over_an_image_inputs_pixels(image, out, axis):
    expected = {} if axis is None else {"y": axis}
    assert metricdetection.label_map_outputs(signature(image, out)) == expected


def test_an_integer_output_is_not_class_scores():
    assert metricdetection.label_map_outputs(signature([1, 3, 8, 8], [1, 4, 8, 8], "int64")) == {}


def test_label_map_iou_averages_the_classes_present():
    a = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    assert label_map_iou(a, a, 5) == 1.0
    b = a.copy()
    b[0, 0] = 2  # class 0 loses a pixel (3/4), class 1 keeps all (1), class 2 is new (0/1)
    assert label_map_iou(a, b, 5) == pytest.approx((3 / 4 + 1 + 0) / 3)


def test_pixels_are_judged_by_their_label_maps():
    logits = RNG.normal(size=(1, 6, 8, 8)).astype(np.float32)
    reference = [{"y": logits}]
    specs = metricdetection.metric_specs(reference, label_maps={"y": 1})
    assert specs["y"] == MetricSpec("pixels", (("axis", 1),))
    flipped = logits.copy()
    flipped[0, :, :4] = flipped[0, ::-1, :4]  # the top half's classes change
    fidelity = compare(reference, [{"y": flipped}], specs)
    assert fidelity.outputs[0].metric == "pixels:axis=1"
    assert fidelity.score < 0.7
    assert compare(reference, [{"y": logits * 1.5}], specs).score == 1.0  # argmax kept


def test_a_given_pixels_metric_reads_its_axis():
    logits = RNG.normal(size=(2, 8, 8, 3)).astype(np.float32)
    _, spec = parse_metric("y=pixels:axis=3")
    specs = metricdetection.metric_specs([{"y": logits}], {"y": spec})
    assert compare([{"y": logits}], [{"y": logits}], specs).outputs[0].samples == 2
    with pytest.raises(InputError, match="needs per-pixel class scores"):
        metricdetection.metric_specs([{"y": logits}], {"y": parse_metric("y=pixels:axis=4")[1]})
    with pytest.raises(InputError, match="axis=-1: must be >= 0"):
        parse_metric("y=pixels:axis=-1")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_the_search_judges_a_segmenter_by_its_label_maps(tmp_path, save_model, quick, layout):
    path = save_model(models.segmenter(layout=layout))
    result = search.compress(path, tmp_path / "out", passes="fp16", settings=quick)
    (judged,) = result.candidates[0]["fidelity"]["outputs"].values()
    assert judged["metric"] == f"pixels:axis={1 if layout == 'nchw' else 3}"


@pytest.mark.parametrize(
    ("dtypes", "tokens"),
    [
        (["int64"], True),
        (["int64", "bool"], True),  # ids and a mask
        (["int32", "bool"], True),
        (["uint8"], False),  # an image's pixels
        (["int16"], False),  # PCM audio
        (["float32"], False),  # a recogniser reads pixels or audio
        (["int64", "float32"], False),
        ([], False),
    ],
)
def test_a_model_reads_tokens_when_every_input_is_integer(dtypes, tokens):
    inputs = [{"name": f"i{k}", "dtype": d, "shape": [1, 4]} for k, d in enumerate(dtypes)]
    assert metricdetection.reads_tokens({"inputs": inputs, "outputs": []}) is tokens


def test_a_token_models_sequence_is_judged_step_by_step():
    """[A, A, B] and [A, B, B] read the same text under CTC: a tag moved unseen."""
    logits = RNG.normal(size=(3, 1, 5)).astype(np.float32)  # time-major [T, 1, C]
    reference = [{"y": logits}]
    assert metricdetection.metric_specs(reference)["y"].kind == "ctc"
    spec = metricdetection.metric_specs(reference, tokens=True)["y"]
    assert spec == MetricSpec("steps", (("batch_axis", 1),))
    tags = np.eye(5, dtype=np.float32)
    moved = [{"y": tags[[1, 1, 2]][:, None]}], [{"y": tags[[1, 2, 2]][:, None]}]
    assert compare(*moved, {"y": spec}).score == 0.0
    assert compare(*moved, {"y": MetricSpec("ctc", (("batch_axis", 1),))}).score == 1.0


def test_the_search_judges_a_token_tagger_step_by_step(tmp_path, save_model, quick):
    path = save_model(models.token_tagger())
    np.savez(tmp_path / "ids.npz", ids=RNG.integers(0, 50, (8, 1, 12)))
    result = search.compress(
        path, tmp_path / "out", data=tmp_path / "ids.npz", passes="fp16", settings=quick
    )
    assert result.candidates[0]["fidelity"]["outputs"]["tags"]["metric"] == "steps:batch_axis=0"


def test_few_channels_over_the_pixels_must_be_probabilities_to_be_classes():
    """Optical flow or colour channels ([1, 2, H, W]) lie over the pixels too."""
    flow = RNG.normal(0, 4, (1, 2, 8, 8)).astype(np.float32)
    assert metricdetection.metric_specs([{"y": flow}], label_maps={"y": 1})["y"].kind == "cosine"
    softmax = np.exp(flow) / np.exp(flow).sum(1, keepdims=True)
    specs = metricdetection.metric_specs([{"y": softmax}], label_maps={"y": 1})
    assert specs["y"] == MetricSpec("pixels", (("axis", 1),))


def test_a_given_pixels_metric_on_nhwc_takes_axis_3():
    logits = RNG.normal(size=(1, 16, 16, 5)).astype(np.float32)
    _, spec = parse_metric("y=pixels")
    given = metricdetection.metric_specs([{"y": logits}], {"y": spec})["y"]
    assert given.option("axis") == 3


def test_a_scalar_output_is_judged_by_cosine():
    assert metricdetection.detect([np.float32(3.5).reshape(())]).kind == "cosine"


@pytest.mark.parametrize(("shape", "axis"), [((1, 150, 128, 128), 1), ((1, 21, 16, 16), 1)])
def test_a_given_pixels_metric_on_nchw_with_many_classes_keeps_axis_1(shape, axis):
    """More classes than pixels across is still NCHW (ADE20K's 150 at 128x128)."""
    logits = RNG.normal(size=shape).astype(np.float32)
    given = metricdetection.metric_specs([{"y": logits}], {"y": parse_metric("y=pixels")[1]})
    assert given["y"].option("axis") == axis
