"""Which task metric judges an output: the kinds, their options, ``--metric`` parsing.

Each output of a model gets a task metric, detected from its dtype, shape and values
(:mod:`~slimfleet.host.compress.metricdetection`) or given with
``--metric OUTPUT=KIND[:OPTION=VALUE,...]``:

``top1``
    class scores ``[..., C]``: share of rows whose argmax (the predicted class) agrees.
``ctc`` (options ``blank``, default 0; ``batch_axis``)
    sequence scores ``[N, T, C]`` or ``[T, N, C]``: share of sequences whose greedy-CTC
    decoding (argmax per step, repeats collapsed, blanks dropped) equals the original's;
    the per-step argmax agreement is reported beside it.
``steps`` (option ``batch_axis``)
    sequence tagging: share of sequences whose every per-step argmax agrees.
``iou`` (option ``threshold``, default 0.5)
    probability maps (masks, saliency): mean IoU of the maps thresholded at ``threshold``.
``binary`` (option ``threshold``)
    single probabilities (a wake word, a yes/no head): share of decisions that agree.
``cosine``
    embeddings, features, boxes and anything else float: mean cosine similarity per sample.
``exact``
    integer and bool outputs: share of samples whose output is identical.
``ignore``
    not judged (a streaming model's state output, a debug tensor).

This module is pure data and parsing: :class:`MetricSpec` is what the detection
returns and the scoring (:mod:`~slimfleet.host.compress.fidelity`) reads; a bad
``--metric`` is an InputError whose one line says what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slimfleet.agent.errors import InputError

PROPORTION_KINDS = ("top1", "ctc", "steps", "binary", "exact")
CONTINUOUS_KINDS = ("iou", "cosine")
KINDS = (*PROPORTION_KINDS, *CONTINUOUS_KINDS, "ignore")
_OPTIONS: dict[str, dict[str, type]] = {
    "top1": {},
    "ctc": {"blank": int, "batch_axis": int},
    "steps": {"batch_axis": int},
    "binary": {"threshold": float},
    "exact": {},
    "iou": {"threshold": float},
    "cosine": {},
    "ignore": {},
}
_DEFAULTS: dict[str, Any] = {"blank": 0, "threshold": 0.5}


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
    return name, MetricSpec(kind, tuple(options), given=True)


def _option_problem(kind: str, key: str, value: Any) -> str | None:
    """What is wrong with one option's value, whatever the output (the output's own
    limits, such as a blank index past its classes, are checked against its values)."""
    if key == "threshold" and not math.isfinite(value):
        return "must be a finite number"
    if key == "threshold" and kind == "iou" and not 0 < value < 1:
        return "an iou threshold cuts a probability map: it must lie between 0 and 1"
    if key in ("blank", "batch_axis") and value < 0:
        return "must be >= 0"
    return None


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
