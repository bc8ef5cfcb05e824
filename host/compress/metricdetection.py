"""Detecting each output's task metric from the original model's values.

:func:`detect` reads one output's dtype, shape and values (the heuristics:
:func:`class_axis`, :func:`looks_like_probabilities`, probability maps, CTC sequence
layouts); :func:`metric_specs` gives every output its :class:`MetricSpec`: the
``--metric`` choice where given, cosine for a streaming model's state outputs
(:func:`state_outputs`), pixels for a segmenter's (:func:`label_map_outputs`), else
detected (steps rather than CTC for a model reading tokens: :func:`reads_tokens`). Pure functions over arrays; they never raise
on odd values (anything unrecognised is judged by cosine).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from slimfleet.agent.errors import InputError
from slimfleet.host.compress.detections import BOX_VALUES, anchors_last
from slimfleet.host.compress.metricspec import MetricSpec, check_against_values, detects_anything

Outputs = dict[str, np.ndarray]

NARROW_CLASSES = 64
"""A float last axis up to this wide can be read as class scores; a wider one only when
its values look like probabilities (rows sum to 1) or a classifier's logits (see
:data:`LOGIT_PEAK`). 384- and 512-wide embeddings are judged by cosine."""
LOGIT_PEAK = 6.0
"""Median z-score of a row's maximum from which a wide axis counts as classifier logits;
a Gaussian-like embedding of 1000 entries peaks near 3."""
MAP_ELEMENTS = 64
"""A float output in [0, 1] with at least this many non-class entries per sample is a
probability map (judged by IoU)."""


def has_values(reference: np.ndarray) -> bool:
    """Whether a sample of an output can judge it: the original gives it a value to
    compare (not an empty tensor, from a zero-sized dimension in the data; not all NaN
    or Inf)."""
    return reference.size > 0 and (
        reference.dtype.kind != "f" or bool(np.isfinite(reference).any())
    )


def as_rows(array: np.ndarray) -> np.ndarray:
    """``array`` as float64 rows of its last axis (``[..., C]`` -> ``[rows, C]``)."""
    return array.reshape(-1, array.shape[-1]).astype(np.float64)


def looks_like_probabilities(array: np.ndarray) -> bool:
    """Every row of the last axis is a probability distribution (softmax output)."""
    rows = as_rows(array)
    return bool(rows.size and rows.min() >= -1e-6 and rows.max() <= 1 + 1e-6) and np.allclose(
        rows.sum(-1), 1.0, atol=1e-3
    )


def class_axis(array: np.ndarray) -> bool:
    """True when the last axis holds class scores, so the argmax is the prediction.

    A float output of rank 1 to 3 whose last axis ``C`` has at least 2 entries, and:
    its rows are probability distributions; or ``C`` is narrow (:data:`NARROW_CLASSES`)
    and either the output is a ``[N, T, C]`` sequence or ``C`` is its longest non-batch
    axis; or ``C`` is that longest axis and rows look like a classifier's logits (signed,
    with a peak of :data:`LOGIT_PEAK` deviations). Embeddings and features are wide and
    flat, box lists and images are not longest on their last axis: not class axes.
    """
    if array.dtype.kind != "f" or not 1 <= array.ndim <= 3 or array.shape[-1] < 2:
        return False
    if looks_like_probabilities(array):
        return True
    narrow = array.shape[-1] <= NARROW_CLASSES
    if narrow and array.ndim == 3:
        return _comparable_columns(array)
    if array.shape[-1] < max(array.shape[1:] or array.shape):
        return False
    if narrow:
        return _comparable_columns(array)
    rows = as_rows(array)
    spread = rows.std(-1)
    peak = (rows.max(-1) - rows.mean(-1)) / np.where(spread > 0, spread, np.inf)
    return bool(rows.min() < 0 and np.median(peak) >= LOGIT_PEAK)


COLUMN_SCALE_RATIO = 50.0
"""Scores of one class axis vary on comparable scales; a ``[N, anchors, 4 + 1 + K]``
detector's rows mix box coordinates, objectness and class scores, whose spreads differ
by two orders of magnitude or more (ddddocr's detector: 131x), so its last axis is not
read as classes (nor its rows as CTC time steps)."""


CONSTANT_COLUMN = 1e-3
"""A column whose spread is below this share of its mean's magnitude holds one value: a
class the model never predicts (lac's tagger: 10 of 59 tags at -13.7 with a spread of
1e-4, 7e-6 of it). It says nothing about the scales of the others and is left out of
the comparison; a detector's score columns vary around their level (spread about half
their mean) and stay in."""


def _comparable_columns(array: np.ndarray) -> bool:
    """The last axis's columns that vary (see :data:`CONSTANT_COLUMN`) vary within
    :data:`COLUMN_SCALE_RATIO` of each other."""
    rows = as_rows(array)
    spread, level = rows.std(0), np.abs(rows.mean(0))
    varying = np.isfinite(spread) & (spread > CONSTANT_COLUMN * level)
    spread = spread[varying]
    if spread.size < 2 or spread.max() == 0:
        return True  # constant or a single column: nothing tells them apart
    return bool(spread.max() <= COLUMN_SCALE_RATIO * spread.min())


TAGGER_CLASSES = 2
"""A sequence of two signed scores per step is a tagger's (a word boundary or not:
khmersm's segmenter), judged step by step, not CTC over a blank and a one-letter
alphabet, whose decoding hides which steps moved ([1, 1, 0, 1] and [1, 0, 0, 1] both
read "11"). Two values per step that are never negative are coordinates (landmarks,
keypoints in pixels): cosine."""


ANCHORS_PER_VALUE = 8
"""A detector head scores many more anchors than it has values per anchor (320n:
2,100 anchors of 22 values; 640x640 YOLOv8: 8,400 of 84)."""


BOX_OVERHANG = 0.1
"""How far below zero, as a share of the largest box value, a box centre may lie (320n:
-0.66 against 323 pixels)."""


def detector_spec(reference: Sequence[np.ndarray]) -> MetricSpec | None:
    """The ``detections`` metric when the output is a one-stage detector's raw head,
    else None. Two layouts, told apart by which axis is at least
    :data:`ANCHORS_PER_VALUE` times the other: ``[N, 4 + C, A]`` (YOLOv8 and later,
    class probabilities only) and ``[N, A, 5 + C]`` (YOLOv5/v7 and YOLOX, with an
    objectness column that multiplies the class probabilities). The four box values are
    pixels (some beyond 1; none below -:data:`BOX_OVERHANG` of the largest: a centre may
    lie just off the image), the rest in [0, 1], and some box is detected on the samples
    (on none, every candidate that finds nothing would agree: cosine judges it)."""
    first = reference[0]
    if first.ndim != 3 or not first.size:
        return None
    values, anchors = sorted(first.shape[1:])
    objectness = int(first.shape[2] == values)  # anchors-last: YOLOv5's order
    if values <= BOX_VALUES + objectness or anchors < ANCHORS_PER_VALUE * values:
        return None
    if any(r.ndim != 3 or sorted(r.shape[1:])[0] != values for r in reference):
        return None
    rows = [anchors_last(image) for r in reference for image in r]
    boxes = np.concatenate([r[:, :BOX_VALUES].ravel() for r in rows])
    scores = np.concatenate([r[:, BOX_VALUES:].ravel() for r in rows])
    spec = replace(DETECTIONS, options=(*DETECTIONS.options, ("objectness", objectness)))
    heads = (
        np.isfinite(boxes).all()
        and boxes.max() > 1
        and boxes.min() >= -BOX_OVERHANG * boxes.max()
        and scores.min() >= 0
        and scores.max() <= 1
    )
    return spec if heads and detects_anything(spec, reference) else None


DETECTIONS = MetricSpec("detections", (("score", 0.25), ("iou", 0.5), ("nms", 0.7)))
"""The detected metric of a detector head: Ultralytics' default thresholds."""


def _sequence_layout(array: np.ndarray) -> int | None:
    """The batch axis of a ``[N, T, C]`` / ``[T, N, C]`` sequence output, or None."""
    if array.ndim != 3 or not class_axis(array):
        return None
    if _time_major(array):
        return 1
    if array.shape[1] > 1:
        return 0
    return None  # a single step: plain class scores


def _time_major(array: np.ndarray) -> bool:
    """``[T, 1, C]`` with T > 1: time-major, as CTC recognisers export it."""
    return array.ndim == 3 and array.shape[0] > 1 and array.shape[1] == 1


def _with_layout(spec: MetricSpec, first: np.ndarray) -> MetricSpec:
    """A given ``ctc`` or ``steps`` metric without ``batch_axis`` takes it from the shape:
    ``[T, 1, C]`` is time-major as CTC recognisers export it (judging its T steps as T
    one-step sequences would count characters, not texts). A given ``pixels`` without
    ``axis`` on ``[N, H, W, C]`` (C below both H and W) takes axis 3."""
    if spec.kind == "pixels" and "axis" not in dict(spec.options) and first.ndim == 4:
        channels_last = first.shape[3] < min(first.shape[1:3])  # [N, H, W, C], C < H, W
        return replace(spec, options=(*spec.options, ("axis", 3 if channels_last else 1)))
    if spec.kind not in ("ctc", "steps") or "batch_axis" in dict(spec.options):
        return spec
    return replace(spec, options=(*spec.options, ("batch_axis", 1 if _time_major(first) else 0)))


def _leading_squeezed(array: np.ndarray) -> np.ndarray:
    """``array`` without leading size-1 axes (``[1, 1, 1, 96]`` -> ``[96]``)."""
    shape = list(array.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return array.reshape(shape)


def detect(reference: Sequence[np.ndarray]) -> MetricSpec:
    """The metric for one output, from the original model's values on the samples.

    In order: integers and bools -> exact; a detector's head (:func:`detector_spec`) ->
    detections; values in [0, 1] that are not rows of
    probabilities, with at least :data:`MAP_ELEMENTS` entries -> iou; sequence scores
    -> steps with :data:`TAGGER_CLASSES` signed classes (cosine when never negative),
    else ctc; class scores -> top1; a single probability -> binary; else cosine.
    """
    first = reference[0]
    if first.dtype.kind in "iub":
        return MetricSpec("exact")
    if first.dtype.kind != "f":
        return MetricSpec("ignore")
    if not first.size or not first.ndim:
        return MetricSpec("cosine")  # no values, or one number: no axis to read a kind from
    values = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    finite = values[np.isfinite(values)]
    if heads := detector_spec(reference):
        return heads
    unit_range = finite.size > 0 and finite.min() >= 0 and finite.max() <= 1
    distributions = first.ndim <= 3 and first.shape[-1] >= 2 and looks_like_probabilities(first)
    if unit_range and not distributions and first.size >= MAP_ELEMENTS:
        return MetricSpec("iou", (("threshold", 0.5),))
    batch_axis = _sequence_layout(first)
    if batch_axis is not None and first.shape[-1] <= TAGGER_CLASSES:
        if finite.size and finite.min() < 0 < finite.max():  # scores, not coordinates
            return MetricSpec("steps", (("batch_axis", batch_axis),))
        return MetricSpec("cosine")
    if batch_axis is not None:
        return MetricSpec("ctc", (("blank", 0), ("batch_axis", batch_axis)))
    squeezed = _leading_squeezed(first)
    if squeezed.ndim <= 2 and class_axis(squeezed):
        return MetricSpec("top1")
    if unit_range and first.size < 2:
        return MetricSpec("binary", (("threshold", 0.5),))
    return MetricSpec("cosine")


def state_outputs(signature: dict[str, list[dict[str, Any]]]) -> set[str]:
    """Float outputs shaped and typed like one of the inputs: a streaming model's state
    (``h_out`` for ``h_in``), judged by cosine rather than as class scores."""
    inputs = {
        (spec["dtype"], tuple(spec["shape"]))
        for spec in signature["inputs"]
        if spec["shape"] and spec["dtype"].startswith("float")
    }
    return {
        spec["name"]
        for spec in signature["outputs"]
        if spec["shape"] and (spec["dtype"], tuple(spec["shape"])) in inputs
    }


TOKEN_TYPES = ("int32", "int64", "uint32", "uint64", "bool")
"""Types of token ids and their masks; 8- and 16-bit integers are pixels and audio."""


def reads_tokens(signature: dict[str, list[dict[str, Any]]]) -> bool:
    """Every input is a 32/64-bit integer or bool (token ids and their masks): the model
    reads text,
    so a sequence of class scores it emits is a tag or token per step (lac's tagger, a
    language model's next tokens), judged step by step: CTC's collapse of repeats would
    hide a tag that moved (``[A, A, B]`` and ``[A, B, B]`` both read "AB"). A CTC
    recogniser reads a signal (pixels, audio): float input."""
    kinds = [spec["dtype"] for spec in signature["inputs"]]
    return bool(kinds) and all(k in TOKEN_TYPES for k in kinds)


MANY_CLASSES = 5
"""A segmenter's class count from which per-pixel scores are read as classes whatever
their values; two to four channels over an image's pixels are as often something else
(optical flow, colour channels, RGBA), so there they must be probabilities that sum to
1 over the channels."""


def class_scores(values: Sequence[np.ndarray], axis: int) -> bool:
    """Per-pixel scores on ``axis`` read as classes: :data:`MANY_CLASSES` or more of
    them, or fewer that are probabilities (softmax over the channels)."""
    first = values[0]
    if first.ndim <= axis or first.shape[axis] < 2:
        return False
    if first.shape[axis] >= MANY_CLASSES:
        return True
    return all(looks_like_probabilities(np.moveaxis(v, axis, -1)) for v in values)


IMAGE_CHANNELS = (1, 3)
"""An input with this many channels is an image (gray, RGB); a 4- or 16-channel input
is a feature map, RGBA or depth, whose same-sized outputs are not known to be classes."""


def label_map_outputs(signature: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Float rank-4 outputs laid out over a float image input's pixels (1 or 3
    channels: :data:`IMAGE_CHANNELS`), with their class axis: ``[N, C, H, W]`` with the input's H and W (the same sizes, or the same dim
    names) -> 1; ``[N, H, W, C]`` over an ``[N, H, W, channels]`` input -> 3. C must be
    a fixed 2 or more and differ from the input's channel count: an image made from an
    image (a matte, a denoised or super-resolved picture) is not class scores."""
    images = [
        spec["shape"]
        for spec in signature["inputs"]
        if spec["shape"] and len(spec["shape"]) == 4 and spec["dtype"].startswith("float")
    ]
    found = {}
    for out in signature["outputs"]:
        shape = out["shape"]
        if not shape or len(shape) != 4 or not out["dtype"].startswith("float"):
            continue
        for image in images:
            for axis, pixels in ((1, slice(2, 4)), (3, slice(1, 3))):
                classes = shape[axis]
                if (
                    image[axis] in IMAGE_CHANNELS
                    and None not in image[pixels]
                    and shape[pixels] == image[pixels]
                    and isinstance(classes, int)
                    and classes >= 2
                    and classes != image[axis]
                ):
                    found.setdefault(out["name"], axis)
    return found


def metric_specs(
    reference: Sequence[Outputs],
    given: dict[str, MetricSpec] | None = None,
    states: Iterable[str] = (),
    label_maps: dict[str, int] | None = None,
    tokens: bool = False,
) -> dict[str, MetricSpec]:
    """The metric of every output: ``given`` (``--metric``) where set, cosine for the
    ``states`` (see :func:`state_outputs`), ``pixels`` on the class axis of the
    ``label_maps`` (see :func:`label_map_outputs`), else detected from the values, with
    ``steps`` for a sequence a model reading ``tokens`` emits (see :func:`reads_tokens`).

    A ``given`` name that is not an output is an InputError naming the outputs; so is
    every output ignored (nothing would judge a candidate: any would score 1.0).
    """
    given = dict(given or {})
    names = list(reference[0]) if reference else []
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputError(f"--metric {unknown[0]!r}: the model has no such output ({names})")
    for name, spec in given.items():
        given[name] = _with_layout(spec, reference[0][name])
        check_against_values(name, given[name], [r[name] for r in reference])
    states, label_maps = set(states), label_maps or {}

    def found(name: str) -> MetricSpec:
        if name in states:
            return MetricSpec("cosine")
        if name in label_maps and class_scores([r[name] for r in reference], label_maps[name]):
            return MetricSpec("pixels", (("axis", label_maps[name]),))
        spec = detect([r[name] for r in reference])
        if tokens and spec.kind == "ctc":
            return MetricSpec("steps", (("batch_axis", spec.option("batch_axis")),))
        return spec

    specs = {n: given.get(n) or found(n) for n in names}
    for name, spec in specs.items():
        if spec.kind != "ignore" and not any(has_values(r[name]) for r in reference):
            raise InputError(
                f"output {name!r}: the original gives it no value to compare on any sample "
                f"(empty, or all NaN or Inf): check the data, or leave it out with "
                f"--metric {name}=ignore"
            )
    if specs and all(spec.kind == "ignore" for spec in specs.values()):
        raise InputError(
            f"no output can judge a candidate: {', '.join(map(repr, specs))} "
            f"{'is' if len(specs) == 1 else 'are all'} ignored (given so with --metric, or "
            "strings slimfleet cannot compare); give one a --metric OUT=KIND"
        )
    return specs


def signature_specs(
    reference: Sequence[Outputs],
    signature: dict[str, list[dict[str, Any]]],
    given: dict[str, MetricSpec] | None = None,
) -> dict[str, MetricSpec]:
    """:func:`metric_specs` with what the model's signature tells (its state outputs,
    label maps and whether it reads tokens): how the search judges the outputs, and what
    recovery's distillation loss aims at."""
    return metric_specs(
        reference,
        given,
        state_outputs(signature),
        label_map_outputs(signature),
        reads_tokens(signature),
    )
