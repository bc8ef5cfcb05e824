"""A detector is judged by its detections: boxes after the threshold and suppression."""

from __future__ import annotations

import numpy as np
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import metricdetection
from slimfleet.host.compress.detections import (
    MAX_DETECTIONS,
    Detections,
    detections,
    matched,
    same_detections,
)
from slimfleet.host.compress.fidelity import compare
from slimfleet.host.compress.metricspec import parse_metric

ANCHORS = 200
CLASSES = 3


def head(*boxes: tuple[float, float, float, float, int, float]) -> np.ndarray:
    """A YOLOv8 head ``[4 + C, A]`` with the given boxes (cx, cy, w, h, class, score) on
    the first anchors and background (scores 0.01) everywhere else."""
    rng = np.random.default_rng(len(boxes))
    array = np.zeros((4 + CLASSES, ANCHORS), np.float32)
    array[:2] = rng.uniform(10, 300, (2, ANCHORS))
    array[2:4] = rng.uniform(5, 40, (2, ANCHORS))
    array[4:] = 0.01
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        array[:4, i] = cx, cy, w, h
        array[4 + cls, i] = score
    return array


PERSON = (100, 100, 40, 80, 0, 0.9)
DOG = (200, 220, 60, 40, 2, 0.7)


def found(array: np.ndarray, **options):
    return detections(array, options.get("score", 0.25), 0.7, options.get("objectness", False))


def test_threshold_and_suppression():
    twin = (102, 101, 40, 80, 0, 0.8)  # the same person, one anchor over: suppressed
    other_class = (102, 101, 40, 80, 1, 0.6)  # overlapping, another class: kept
    faint = (250, 50, 20, 20, 1, 0.2)
    result = found(head(PERSON, twin, other_class, DOG, faint))
    assert list(result.classes) == [0, 2, 1]
    np.testing.assert_allclose(result.scores, [0.9, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(result.boxes[0], [80, 60, 120, 140])


def test_either_layout_detects_the_same():
    array = head(PERSON, DOG)
    one, other = found(array), found(array.T.copy())
    assert len(one) == len(other) == 2
    np.testing.assert_array_equal(one.boxes, other.boxes)


def test_objectness_multiplies_the_class_scores():
    rows = np.zeros((ANCHORS, 5 + CLASSES), np.float32)
    rows[:, 2:4] = 10
    rows[0, :5] = 50, 50, 20, 20, 0.5  # objectness 0.5 x class 0.9: 0.45
    rows[0, 5] = 0.9
    rows[1, :5] = 90, 90, 20, 20, 0.2  # 0.2 x 0.9: below 0.25
    rows[1, 6] = 0.9
    result = found(rows, objectness=True)
    assert list(result.classes) == [0]
    np.testing.assert_allclose(result.scores, [0.45], rtol=1e-6)


@pytest.mark.parametrize(
    ("candidate", "same"),
    [
        (head(PERSON, DOG), True),
        (head((104, 98, 42, 80, 0, 0.6), (198, 221, 60, 42, 2, 0.3)), True),  # moved a little
        (head(PERSON), False),  # the dog is gone
        (head(PERSON, DOG, (250, 50, 20, 20, 1, 0.5)), False),  # a new box
        (head(PERSON, (200, 220, 60, 40, 1, 0.7)), False),  # the dog became class 1
        (head(PERSON, (240, 220, 60, 40, 2, 0.7)), False),  # the dog moved: IoU 0.2
    ],
)
def test_same_detections_one_to_one(candidate, same):
    want = found(head(PERSON, DOG))
    assert same_detections(want, found(candidate), 0.5) is same


def test_two_candidates_cannot_match_one_box_twice():
    want = found(head(PERSON, (100, 100, 40, 80, 0, 0.3)))  # suppressed twin: one box
    got = found(head(PERSON, (300, 300, 40, 80, 0, 0.9)))
    assert (len(want), len(got), matched(want, got, 0.5)) == (1, 2, 1)


def test_a_head_scoring_every_anchor_is_bounded():
    """4000 separate boxes all at 0.99: the best MAX_CANDIDATES enter suppression and
    MAX_DETECTIONS come out, highest first."""
    anchors = 4000
    rng = np.random.default_rng(3)
    everything = np.zeros((4 + CLASSES, anchors), np.float32)
    everything[0] = np.arange(anchors) * 20.0  # side by side, never overlapping
    everything[1], everything[2:4] = 50, 10
    everything[4] = rng.uniform(0.5, 0.99, anchors)
    result = found(everything)
    assert len(result) == MAX_DETECTIONS
    np.testing.assert_array_equal(result.scores, np.sort(everything[4])[::-1][:MAX_DETECTIONS])


def test_matching_finds_the_pairing_when_best_overlaps_cross():
    """A's best candidate is X, but B can only take X: a maximum matching pairs A with
    Y and B with X (greedy matching by best overlap found one pair)."""
    want = Detections(
        np.array([[0, 0, 10, 10], [4, 0, 14, 10]], float), np.array([0, 0]), np.array([0.9, 0.8])
    )
    got = Detections(
        np.array([[1, 0, 11, 10], [-3, 0, 7, 10]], float), np.array([0, 0]), np.array([0.9, 0.8])
    )
    assert matched(want, got, 0.5) == 2 and same_detections(want, got, 0.5)


def test_a_zero_area_box_matches_itself():
    dot = found(head((100, 100, 0, 0, 1, 0.9)))
    assert len(dot) == 1 and same_detections(dot, dot, 0.5)


@pytest.mark.parametrize("shape", [(4 + CLASSES, 0), (4, ANCHORS)])
def test_no_anchors_or_no_classes_detect_nothing(shape):
    assert len(found(np.zeros(shape, np.float32))) == 0


def test_a_nan_score_does_not_hide_the_class_that_scored():
    array = head(PERSON)
    array[5, 0] = np.nan
    assert list(found(array).classes) == [0]


def test_a_yolov8_head_is_detected_and_judged_by_detections():
    """320n's head: cosine 0.999 while static int8 rounded every probability to 0."""
    reference = [{"output0": head(PERSON, DOG)[None]}, {"output0": head(DOG)[None]}]
    assert metricdetection.metric_specs(reference)["output0"].kind == "detections"
    blind = [{"output0": r["output0"].copy()} for r in reference]
    for b in blind:
        b["output0"][:, 4:] = 0
    fidelity = compare(reference, blind)
    worst = fidelity.worst()
    assert worst.metric == "detections:score=0.25,iou=0.5,nms=0.7,objectness=0"
    assert worst.score == 0.0
    assert worst.cosine > 0.99  # what the proxy said
    assert compare(reference, reference).score == 1.0


@pytest.mark.parametrize(
    "array",
    [
        head(PERSON)[None] / 400,  # boxes as fractions: not pixels
        head(PERSON)[None, :, :40],  # 40 anchors of 7 values: too few for a head
        np.random.default_rng(0).normal(size=(1, 7, 200)),  # a feature map
        head()[None],  # a head that detects nothing here: any candidate finding nothing agrees
        np.zeros((0, 7, 200)),  # no images
    ],
)
def test_other_outputs_are_not_detector_heads(array):
    assert metricdetection.detect([array.astype(np.float32)]).kind != "detections"


def test_a_yolov5_head_is_detected_with_its_objectness():
    """[N, A, 5 + C]: the fifth column multiplies the class probabilities."""
    rows = head(PERSON, DOG).T.copy()  # [A, 4 + 3]: read as objectness + 2 classes
    rows[:, 4] = 0.02  # background objectness
    rows[0, 4], rows[1, 4] = 0.95, 0.9  # the person's and the dog's
    rows[0, 5] = 0.9  # the person: class 0 of the two
    rows[1, 6] = 0.7  # the dog: class 1
    reference = [{"out": rows[None]}]
    spec = metricdetection.metric_specs(reference)["out"]
    assert spec.label() == "detections:score=0.25,iou=0.5,nms=0.7,objectness=1"
    found_here = found(rows, objectness=True)
    assert list(found_here.classes) == [0, 1]  # the person (0.95 x 0.9), the dog (0.9 x 0.7)
    without = rows.copy()
    without[1, 4] = 0.1  # the dog's objectness gone: 0.07
    assert compare(reference, [{"out": without[None]}], {"out": spec}).score == 0.0


def test_a_given_detections_metric():
    _, spec = parse_metric("out=detections:score=0.5,iou=0.6,nms=0.45,objectness=1")
    assert (spec.option("score"), spec.option("iou"), spec.option("nms")) == (0.5, 0.6, 0.45)
    assert spec.option("objectness") == 1
    reference = [{"out": head(PERSON).T[None]}]
    specs = metricdetection.metric_specs(reference, {"out": parse_metric("out=detections")[1]})
    assert compare(reference, reference, specs).score == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("out=detections:iou=1.5", "an overlap must lie between 0 and 1"),
        ("out=detections:nms=0", "an overlap must lie between 0 and 1"),
        ("out=detections:objectness=2", "must be 0 or 1"),
        ("out=detections:score=inf", "must be a finite number"),
        ("out=detections:blank=0", "detections takes options score, iou, nms, objectness"),
    ],
)
def test_bad_detections_options(text, message):
    with pytest.raises(InputError, match=message):
        parse_metric(text)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.zeros((1, 8)), r"needs a detector head \[N, 4 \+ C, anchors\]"),
        (np.zeros((1, 200, 4)), "at least 5 values per box"),
        (np.zeros((1, 84, 84)), "more anchors than values"),  # which axis holds the values?
        (head()[None], "the original detects nothing at score 0.25"),
    ],
)
def test_a_given_detections_metric_needs_a_head_that_detects(values, message):
    with pytest.raises(InputError, match=message):
        metricdetection.metric_specs([{"out": values}], {"out": parse_metric("out=detections")[1]})
