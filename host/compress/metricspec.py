"""Which task metric judges an output: the kinds, their options, ``--metric`` parsing.

Each output of a model gets a task metric, detected from its dtype, shape and values
(:mod:`~slimfleet.host.compress.metricdetection`) or given with
``--metric OUTPUT=KIND[:OPTION=VALUE,...]``:

``top1``
    class scores ``[..., C]``: share of rows whose argmax (the predicted class) agrees.
``ctc`` (options ``blank``, default 0; ``batch_axis``; ``labels``; ``case``)
    sequence scores ``[N, T, C]`` or ``[T, N, C]``: share of sequences whose greedy-CTC
    decoding (argmax per step, repeats collapsed, blanks dropped) equals the original's;
    the per-step argmax agreement is reported beside it. ``labels=FILE`` names each
    class (a JSON list of strings, or one label per line; entry ``i`` is class ``i``) so
    sequences compare as the texts they spell, and ``case=insensitive`` then compares
    them with letter case folded, the standard scene-text protocol and how most captcha
    checks compare (class ids that spell the same text agree either way).
``steps`` (option ``batch_axis``)
    sequence tagging: share of sequences whose every per-step argmax agrees.
``detections`` (options ``score``, default 0.25; ``iou``, default 0.5; ``nms``, default
0.7; ``objectness``, default 0)
    a one-stage detector's raw head, ``[N, 4 + C, A]`` (YOLOv8 and later) or
    ``[N, A, 4 + C]`` (``[N, A, 5 + C]`` with ``objectness=1``, YOLOv5/v7): share of
    images whose detections (best class score at least ``score``, non-maximum suppression
    at ``nms``) agree, each box matched one to one by class and IoU >= ``iou`` (see
    :mod:`~slimfleet.host.compress.detections`).
``pixels`` (option ``axis``, default 1)
    per-pixel class scores of a segmenter, ``[N, C, H, W]`` (``axis=3``: ``[N, H, W, C]``):
    per image, the mean IoU over classes of the two label maps (argmax over ``axis``),
    counting the classes present in either.
``iou`` (option ``threshold``, default 0.5)
    probability maps (masks, saliency): mean IoU of the maps thresholded at ``threshold``.
``binary`` (option ``threshold``)
    single probabilities (a wake word, a yes/no head): share of decisions that agree.
``cosine``
    embeddings, features, boxes and anything else float: per sample, the cosine
    similarity times the smaller norm over the larger (an output scaled by 0.65 scores
    0.65, not 1; a scalar is judged by its size, not only its sign); the mean over samples.
``exact``
    integer and bool outputs: share of samples whose output is identical.
``ignore``
    not judged (a streaming model's state output, a debug tensor).

This module is pure data and parsing: :class:`MetricSpec` is what the detection
returns and the scoring (:mod:`~slimfleet.host.compress.fidelity`) reads; a bad
``--metric`` is an InputError whose one line says what is wrong.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from slimfleet.agent.errors import InputError
from slimfleet.agent.store import read_bounded
from slimfleet.agent.wire import loads_json
from slimfleet.host.compress.detections import BOX_VALUES, detections

PROPORTION_KINDS = ("top1", "ctc", "steps", "detections", "binary", "exact")
CONTINUOUS_KINDS = ("pixels", "iou", "cosine")
KINDS = (*PROPORTION_KINDS, *CONTINUOUS_KINDS, "ignore")
_OPTIONS: dict[str, dict[str, type]] = {
    "top1": {},
    "ctc": {"blank": int, "batch_axis": int, "labels": str, "case": str},
    "steps": {"batch_axis": int},
    "detections": {"score": float, "iou": float, "nms": float, "objectness": int},
    "binary": {"threshold": float},
    "exact": {},
    "pixels": {"axis": int},
    "iou": {"threshold": float},
    "cosine": {},
    "ignore": {},
}
_DEFAULTS: dict[str, Any] = {
    "blank": 0,
    "threshold": 0.5,
    "case": "sensitive",
    "score": 0.25,
    "iou": 0.5,
    "nms": 0.7,
    "objectness": 0,
    "axis": 1,
}
CASES = ("sensitive", "insensitive")
MAX_LABELS_BYTES = 16 * 2**20
"""A labels file is read whole: a charset of 100,000 classes is well under this."""


@dataclass(frozen=True)
class MetricSpec:
    """How one output is judged: a kind from :data:`KINDS` and its options."""

    kind: str
    options: tuple[tuple[str, Any], ...] = ()
    given: bool = False
    """True when the user chose it with ``--metric``; False when detected."""

    def option(self, name: str) -> Any:
        return dict(self.options).get(name, _DEFAULTS.get(name))

    def label(self) -> str:
        """``ctc:blank=0`` as on the command line."""
        if not self.options:
            return self.kind
        return f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.options)


def parse_metric(text: str) -> tuple[str, MetricSpec]:
    """Parse ``--metric OUTPUT=KIND[:OPTION=VALUE,...]``; an InputError says what is wrong."""
    name, sep, rest = text.partition("=")  # output names may hold ':' (onnx::Shape_4)
    if not sep or not name or not rest:
        raise InputError(f"--metric {text!r}: expected OUTPUT=KIND, e.g. logits=ctc:blank=0")
    kind, _, opts = rest.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise InputError(f"--metric {text!r}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    options = []
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        allowed = _OPTIONS[kind]
        if not eq or key not in allowed:
            known = ", ".join(allowed) or "none"
            raise InputError(f"--metric {text!r}: {kind} takes options {known}; got {item!r}")
        try:
            parsed = allowed[key](value)
        except ValueError:
            raise InputError(
                f"--metric {text!r}: {key}={value!r} is not a {allowed[key].__name__}"
            ) from None
        if problem := _option_problem(kind, key, parsed):
            raise InputError(f"--metric {text!r}: {key}={value}: {problem}")
        options.append((key, parsed))
    spec = MetricSpec(kind, tuple(options), given=True)
    if spec.option("case") == "insensitive" and spec.option("labels") is None:
        raise InputError(
            f"--metric {text!r}: case=insensitive needs labels=FILE (what each class spells)"
        )
    return name, spec


def _option_problem(kind: str, key: str, value: Any) -> str | None:
    """What is wrong with one option's value, whatever the output (the output's own
    limits, such as a blank index past its classes, are checked against its values)."""
    if key == "threshold" and not math.isfinite(value):
        return "must be a finite number"
    if key == "threshold" and kind == "iou" and not 0 < value < 1:
        return "an iou threshold cuts a probability map: it must lie between 0 and 1"
    if key == "score" and not math.isfinite(value):
        return "must be a finite number"
    if key in ("iou", "nms") and not 0 < value < 1:
        return "an overlap must lie between 0 and 1"
    if key == "objectness" and value not in (0, 1):
        return "must be 0 or 1"
    if key in ("blank", "batch_axis", "axis") and value < 0:
        return "must be >= 0"
    if key == "case" and value not in CASES:
        return f"must be one of {', '.join(CASES)}"
    if key == "labels":
        try:
            ctc_labels(value)
        except InputError as exc:
            return str(exc)
    return None


@functools.lru_cache(maxsize=8)
def ctc_labels(path: str) -> tuple[str, ...]:
    """What each class spells, from a JSON list of strings or a file of one label per
    line (entry ``i`` is class ``i``); an InputError says why a file cannot be one."""
    try:
        data = read_bounded(path, MAX_LABELS_BYTES).decode("utf-8")
    except (OSError, ValueError) as exc:  # FileTooLarge and UnicodeDecodeError included
        raise InputError(f"cannot read labels file {path}: {exc}") from None
    if data.lstrip().startswith("["):
        try:
            labels = loads_json(data)
        except ValueError as exc:
            raise InputError(f"labels file {path} is not a JSON list: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InputError(f"labels file {path}: a JSON labels file is a list of strings")
    else:
        labels = data.split("\n")
        if labels and labels[-1] == "":
            labels.pop()  # the newline that ends the last line
        labels = [label.removesuffix("\r") for label in labels]
    if not labels:
        raise InputError(f"labels file {path} names no class")
    return tuple(labels)


def check_against_values(name: str, spec: MetricSpec, values: list[Any]) -> None:
    """InputError when a ``--metric`` choice cannot judge this output's values (the
    original's, on the evaluation samples): a blank index past the classes, a batch axis
    past the rank, a threshold no value crosses (every candidate would agree)."""
    label = f"--metric {name}={spec.label()}"
    shapes = {tuple(v.shape) for v in values}
    if spec.kind in ("ctc", "steps"):
        ranks = {len(s) for s in shapes}
        axis = spec.option("batch_axis") or 0
        if ranks - {2, 3} or (axis and ranks != {3}) or axis > 1:
            raise InputError(
                f"{label}: needs [N, T, C] or [T, N, C] scores with batch_axis 0 or 1, "
                f"got shape {list(sorted(shapes)[0])}"
            )
        classes = min(s[-1] for s in shapes)
        blank = spec.option("blank")
        if spec.kind == "ctc" and blank >= classes:
            raise InputError(f"{label}: blank {blank} is not one of the {classes} classes")
        labels = spec.option("labels")
        if spec.kind == "ctc" and labels is not None and len(ctc_labels(labels)) != classes:
            raise InputError(
                f"{label}: the labels file names {len(ctc_labels(labels))} classes, "
                f"the output has {classes}"
            )
    if spec.kind == "detections":
        values_per_box = BOX_VALUES + 1 + spec.option("objectness")
        if any(len(s) != 3 or min(s[1:]) < values_per_box or s[1] == s[2] for s in shapes):
            raise InputError(
                f"{label}: needs a detector head [N, 4 + C, anchors] or [N, anchors, 4 + C] "
                f"with at least {values_per_box} values per box and more anchors than "
                f"values (the shorter axis holds the values), got shape "
                f"{list(sorted(shapes)[0])}"
            )
        if not detects_anything(spec, values):
            raise InputError(
                f"{label}: the original detects nothing at score {spec.option('score')} on "
                "these samples, so every candidate that detects nothing would agree with it"
            )
    if spec.kind == "pixels":
        axis = spec.option("axis")
        if any(len(s) < 3 or axis >= len(s) or axis == 0 or s[axis] < 2 for s in shapes):
            raise InputError(
                f"{label}: needs per-pixel class scores [N, C, H, W] with 2 or more classes "
                f"on axis {axis} (1 to rank - 1), got shape {list(sorted(shapes)[0])}"
            )
    if spec.kind in ("iou", "binary"):
        threshold = spec.option("threshold")
        above = [bool((v > threshold).any()) for v in values]
        below = [bool((v <= threshold).any()) for v in values]
        if not any(above) or not any(below):
            side = "above" if not any(above) else "at or below"
            raise InputError(
                f"{label}: no value of the original's is {side} {threshold} on these "
                "samples, so every candidate would agree with it"
            )


def detects_anything(spec: MetricSpec, values: list[Any]) -> bool:
    """Some image of the original's ``[N, ...]`` heads has a detection under ``spec``."""
    options = spec.option("score"), spec.option("nms"), bool(spec.option("objectness"))
    return any(len(detections(head, *options)) for batch in values for head in batch)
