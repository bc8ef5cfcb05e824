"""Scoring a candidate's outputs against the original's, the way the model's user would.

Each output is judged by its task metric (a :class:`MetricSpec`, see
:mod:`~slimfleet.host.compress.metricspec` for the kinds and
:mod:`~slimfleet.host.compress.metricdetection` for how they are detected).
Every score comes with its sample count and a 95% interval: a Wilson score interval for
proportions (top1, ctc, steps, detections, binary, exact), a percentile bootstrap of the mean
(see :mod:`~slimfleet.host.compress.intervals`) for the continuous ones (pixels, iou,
cosine).
When the budget lies inside a candidate's interval, :func:`samples_to_settle` estimates
how many samples would decide it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.host.compress.detections import detections, same_detections
from slimfleet.host.compress.intervals import bootstrap, wilson
from slimfleet.host.compress.metricdetection import (
    Outputs,
    as_rows,
    detect,
    has_values,
    metric_specs,
)
from slimfleet.host.compress.metricspec import PROPORTION_KINDS, MetricSpec, ctc_labels

if TYPE_CHECKING:
    from slimfleet.host.metrics import Metric


@dataclass
class OutputFidelity:
    """How one output of a candidate compares with the original's, over all samples."""

    name: str
    metric: str
    """The metric's label, e.g. ``ctc:blank=0,batch_axis=1`` or ``cosine``."""
    score: float
    samples: int
    """Units the score is a share or mean of (rows, sequences or samples)."""
    interval: tuple[float, float] | None = None
    """The 95% interval of ``score``; None with fewer than 2 units."""
    interval_method: str = ""
    """``wilson`` or ``bootstrap``."""
    detected: bool = True
    step_agreement: float | None = None
    """For sequence metrics: share of time steps whose argmax agrees."""
    cosine: float | None = None
    max_abs_error: float | None = None


@dataclass
class Fidelity:
    """Per-output fidelity, or the ``problem`` (wrong shape, NaN/Inf) that rejects outright."""

    outputs: list[OutputFidelity] = field(default_factory=list)
    problem: str | None = None

    @property
    def score(self) -> float:
        """The worst output's score (0 when there is a problem, 1 when nothing is judged)."""
        if self.problem is not None:
            return 0.0
        return min((o.score for o in self.outputs), default=1.0)

    def worst(self) -> OutputFidelity | None:
        return min(self.outputs, key=lambda o: o.score, default=None)


def straddles(output: OutputFidelity, budget: float) -> bool:
    """True when the budget lies inside the score's interval: the data cannot tell."""
    return output.interval is not None and output.interval[0] < budget <= output.interval[1]


def samples_to_settle(output: OutputFidelity, budget: float, limit: int = 10**7) -> int | None:
    """About how many units would put the budget outside the interval, if the score held.

    None when the score equals the budget (no amount of data settles it) or it would
    take more than ``limit``.
    """
    score, n = output.score, output.samples
    if score == budget or n < 1:
        return None
    if output.interval_method == "wilson":
        lo, hi = n, limit
        if not _settled(score, hi, budget):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _settled(score, mid, budget) else (mid + 1, hi)
        return lo
    if output.interval is None:
        return None
    half = (output.interval[1] - output.interval[0]) / 2
    needed = math.ceil(n * (half / abs(score - budget)) ** 2)
    return needed if needed <= limit else None


def _settled(p: float, n: int, budget: float) -> bool:
    low, high = wilson(p * n, n)
    return low >= budget if p > budget else high < budget


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity times the smaller norm over the larger: an output scaled by 0.65
    (an fp16 weight clamped at 65504) or a scalar of the same sign is not "cosine 1",
    and the same direction at the same length still is."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb) * min(na, nb) / max(na, nb))


def ctc_decode(steps: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC: argmax per step, repeats collapsed, blanks dropped."""
    best = steps.argmax(-1)
    keep = np.r_[True, best[1:] != best[:-1]] & (best != blank)
    return [int(c) for c in best[keep]]


def _ctc_text(steps: np.ndarray, spec: MetricSpec) -> list[int] | str:
    """What a ``ctc`` metric compares: the decoded class ids, or the text they spell
    when the spec names labels (case-folded with ``case=insensitive``)."""
    decoded = ctc_decode(steps, spec.option("blank"))
    if spec.option("labels") is None:
        return decoded
    labels = ctc_labels(spec.option("labels"))
    text = "".join(labels[i] for i in decoded)
    return text.casefold() if spec.option("case") == "insensitive" else text


def _sequences(array: np.ndarray, batch_axis: int) -> np.ndarray:
    """``[N, T, C]`` whatever the layout; a rank-2 ``[T, C]`` is one sequence."""
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim != 3:
        raise SlimfleetError(f"a sequence metric needs [N, T, C] scores, got {list(array.shape)}")
    return np.moveaxis(array, batch_axis, 0)


def _units(spec: MetricSpec, ref: np.ndarray, got: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-unit scores for one sample, and per-step agreements for sequence metrics."""
    kind = spec.kind
    if kind == "exact":
        return [float(np.array_equal(ref, got))], []
    if kind == "top1":  # rows the original scores NaN or Inf in judge nothing
        rows, theirs = as_rows(ref), as_rows(got)
        whole = np.isfinite(rows).all(-1)
        return list((rows[whole].argmax(-1) == theirs[whole].argmax(-1)).astype(float)), []
    if kind in ("ctc", "steps"):
        axis = spec.option("batch_axis") or 0
        units, steps = [], []
        for r, g in zip(_sequences(ref, axis), _sequences(got, axis), strict=True):
            same_steps = r.argmax(-1) == g.argmax(-1)
            steps.append(float(same_steps.mean()) if same_steps.size else 1.0)
            if kind == "ctc":
                units.append(float(_ctc_text(r, spec) == _ctc_text(g, spec)))
            else:
                units.append(float(same_steps.all()))
        return units, steps
    if kind == "detections":
        return [_same_detections(spec, r, g) for r, g in zip(ref, got, strict=True)], []
    if kind == "pixels":
        axis = spec.option("axis")
        maps = zip(ref.argmax(axis), got.argmax(axis), strict=True)
        return [label_map_iou(a, b, ref.shape[axis]) for a, b in maps], []
    finite = np.isfinite(ref)
    if kind == "cosine":
        return [cosine(ref[finite], got[finite])], []
    threshold = spec.option("threshold")
    r, g = ref[finite] > threshold, got[finite] > threshold
    if kind == "binary":
        return list((r == g).astype(float)), []
    union = np.count_nonzero(r | g)
    return [np.count_nonzero(r & g) / union if union else 1.0], []


def label_map_iou(reference: np.ndarray, candidate: np.ndarray, classes: int) -> float:
    """Mean IoU over the classes present in either of two label maps (class ids); memory
    is three counts per class, not a classes x classes confusion matrix."""
    a, b = reference.ravel(), candidate.ravel()
    inter = np.bincount(a[a == b], minlength=classes)
    union = np.bincount(a, minlength=classes) + np.bincount(b, minlength=classes) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


def _same_detections(spec: MetricSpec, ref: np.ndarray, got: np.ndarray) -> float:
    """1.0 when one image's candidate head detects what the original's does."""
    if ref.ndim != 2:
        raise SlimfleetError(f"a detections metric needs [N, 4 + C, A] heads, got {ref.ndim + 1}-D")
    found = [
        detections(head, spec.option("score"), spec.option("nms"), bool(spec.option("objectness")))
        for head in (ref, got)
    ]
    return float(same_detections(*found, spec.option("iou")))


def score_output(
    name: str, spec: MetricSpec, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> OutputFidelity | str | None:
    """Score one output over the samples where the original gives it values, or return
    the problem that rejects the candidate; None when no sample has a value to judge it
    by (one sample at a time, as ``chain calibrate`` compares, a detector may find
    nothing: :func:`metric_specs` refuses an output that no sample judges)."""
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        if ref.shape != got.shape:
            return (
                f"output {name!r} has shape {list(got.shape)} where the original has "
                f"{list(ref.shape)} (sample {i})"
            )
        if got.dtype.kind == "f" and not np.isfinite(got[np.isfinite(ref)]).all():
            return f"output {name!r} contains NaN or Inf (sample {i})"
    judged = [i for i, ref in enumerate(reference) if has_values(ref)]
    reference, candidate = [reference[i] for i in judged], [candidate[i] for i in judged]
    units: list[float] = []
    steps: list[float] = []
    try:
        for ref, got in zip(reference, candidate, strict=True):
            sample_units, sample_steps = _units(spec, ref, got)
            units += sample_units
            steps += sample_steps
    except (SlimfleetError, ValueError, IndexError) as exc:
        raise InputError(f"--metric {name}={spec.label()}: {exc}") from None
    if not units:  # nothing to judge on these samples (metric_specs refuses it on all)
        return None
    scores = np.asarray(units, dtype=np.float64)
    result = OutputFidelity(
        name,
        spec.label(),
        float(scores.mean()),
        samples=int(scores.size),
        detected=not spec.given,
        step_agreement=float(np.mean(steps)) if steps else None,
    )
    if scores.size >= 2:
        if spec.kind in PROPORTION_KINDS:
            result.interval, result.interval_method = wilson(scores.sum(), scores.size), "wilson"
        else:
            result.interval, result.interval_method = bootstrap(scores), "bootstrap"
    if reference[0].dtype.kind == "f":
        pairs = [
            (r[np.isfinite(r)], c[np.isfinite(r)])
            for r, c in zip(reference, candidate, strict=True)
        ]
        result.cosine = float(np.mean([cosine(r, c) for r, c in pairs]))
        result.max_abs_error = max(
            float(np.max(np.abs(r.astype(np.float64) - c), initial=0.0)) for r, c in pairs
        )
    return result


def compare(
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    specs: dict[str, MetricSpec] | None = None,
) -> Fidelity:
    """Score ``candidate`` against ``reference`` output by output, sample by sample."""
    if len(reference) != len(candidate):
        return Fidelity(problem=f"{len(candidate)} results for {len(reference)} samples")
    if not reference:
        return Fidelity(problem="no evaluation samples")
    specs = specs or metric_specs(reference)
    fidelity = Fidelity()
    for name in reference[0]:
        if any(name not in c for c in candidate):
            return Fidelity(problem=f"output {name!r} is missing")
        spec = specs.get(name) or detect([r[name] for r in reference])
        if spec.kind == "ignore":
            continue
        scored = score_output(
            name, spec, [r[name] for r in reference], [c[name] for c in candidate]
        )
        if isinstance(scored, str):
            return Fidelity(outputs=fidelity.outputs, problem=scored)
        if scored is not None:
            fidelity.outputs.append(scored)
    return fidelity


def score_metrics(
    metrics: Iterable[Metric], reference: Sequence[Outputs], candidate: Sequence[Outputs]
) -> dict[str, float]:
    """Each plugin task metric's score for ``candidate``; NaN counts as 0.

    A metric that raises becomes a :class:`SlimfleetError` naming it (the candidate fails).
    """
    scores = {}
    for metric in metrics:
        try:
            value = float(metric.compute(reference, candidate))
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise SlimfleetError(
                f"task metric {metric.name!r} raised {type(exc).__name__}: {text}"
            ) from None
        scores[metric.name] = value if math.isfinite(value) else 0.0
    return scores
