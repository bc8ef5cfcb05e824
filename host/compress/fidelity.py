"""Judging a candidate's outputs against the original's, the way the model's user would.

Each output gets a task metric, detected from its dtype, shape and values or given with
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

Every score comes with its sample count and a 95% interval: a Wilson score interval for
proportions (top1, ctc, steps, binary, exact), a percentile bootstrap of the mean
(:data:`BOOTSTRAP_RESAMPLES` resamples, seeded) for the continuous ones (iou, cosine).
When the budget lies inside a candidate's interval, :func:`samples_to_settle` estimates
how many samples would decide it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from slimfleet.agent.errors import InputError, SlimfleetError

if TYPE_CHECKING:
    from slimfleet.host.metrics import Metric

Outputs = dict[str, np.ndarray]

Z95 = 1.959963984540054
"""The standard normal quantile for a two-sided 95% interval."""
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
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
            options.append((key, allowed[key](value)))
        except ValueError:
            raise InputError(
                f"--metric {text!r}: {key}={value!r} is not a {allowed[key].__name__}"
            ) from None
    return name, MetricSpec(kind, tuple(options), given=True)


# -- detection ----------------------------------------------------------------------------


def _rows(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, array.shape[-1]).astype(np.float64)


def looks_like_probabilities(array: np.ndarray) -> bool:
    """Every row of the last axis is a probability distribution (softmax output)."""
    rows = _rows(array)
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
    rows = _rows(array)
    spread = rows.std(-1)
    peak = (rows.max(-1) - rows.mean(-1)) / np.where(spread > 0, spread, np.inf)
    return bool(rows.min() < 0 and np.median(peak) >= LOGIT_PEAK)


COLUMN_SCALE_RATIO = 50.0
"""Scores of one class axis vary on comparable scales; a ``[N, anchors, 4 + 1 + K]``
detector's rows mix box coordinates, objectness and class scores, whose spreads differ
by two orders of magnitude or more (ddddocr's detector: 131x), so its last axis is not
read as classes (nor its rows as CTC time steps)."""


def _comparable_columns(array: np.ndarray) -> bool:
    """The last axis's columns vary within :data:`COLUMN_SCALE_RATIO` of each other."""
    spread = _rows(array).std(0)
    spread = spread[np.isfinite(spread)]
    if spread.size < 2 or spread.max() == 0:
        return True  # constant or a single column: nothing tells them apart
    return bool(spread.max() <= COLUMN_SCALE_RATIO * max(spread.min(), 1e-12))


def _sequence_layout(array: np.ndarray) -> int | None:
    """The batch axis of a ``[N, T, C]`` / ``[T, N, C]`` sequence output, or None."""
    if array.ndim != 3 or not class_axis(array):
        return None
    first, second = array.shape[:2]
    if first > 1 and second == 1:
        return 1  # [T, 1, C]: time-major, as CTC recognisers export
    if second > 1:
        return 0
    return None  # a single step: plain class scores


def _leading_squeezed(array: np.ndarray) -> np.ndarray:
    """``array`` without leading size-1 axes (``[1, 1, 1, 96]`` -> ``[96]``)."""
    shape = list(array.shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return array.reshape(shape)


def detect(reference: Sequence[np.ndarray]) -> MetricSpec:
    """The metric for one output, from the original model's values on the samples.

    In order: integers and bools -> exact; values in [0, 1] that are not rows of
    probabilities, with at least :data:`MAP_ELEMENTS` entries -> iou; sequence scores
    -> ctc; class scores -> top1; a single probability -> binary; else cosine.
    """
    first = reference[0]
    if first.dtype.kind in "iub":
        return MetricSpec("exact")
    if first.dtype.kind != "f":
        return MetricSpec("ignore")
    values = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    finite = values[np.isfinite(values)]
    unit_range = finite.size > 0 and finite.min() >= 0 and finite.max() <= 1
    distributions = first.ndim <= 3 and first.shape[-1] >= 2 and looks_like_probabilities(first)
    if unit_range and not distributions and first.size >= MAP_ELEMENTS:
        return MetricSpec("iou", (("threshold", 0.5),))
    batch_axis = _sequence_layout(first)
    if batch_axis is not None:
        return MetricSpec("ctc", (("blank", 0), ("batch_axis", batch_axis)))
    squeezed = _leading_squeezed(first)
    if squeezed.ndim <= 2 and class_axis(squeezed):
        return MetricSpec("top1")
    if unit_range and first.size < 2:
        return MetricSpec("binary", (("threshold", 0.5),))
    return MetricSpec("cosine")


# -- scoring ------------------------------------------------------------------------------


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


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n``."""
    if n <= 0:
        return (0.0, 1.0)
    if successes >= n:  # closed form at the edge, free of rounding: (n / (n + z^2), 1)
        return (n / (n + z * z), 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(scores: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``scores`` (seeded, repeatable)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = np.empty(BOOTSTRAP_RESAMPLES)
    for i in range(BOOTSTRAP_RESAMPLES):
        means[i] = scores[rng.integers(0, len(scores), len(scores))].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def ctc_decode(steps: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC: argmax per step, repeats collapsed, blanks dropped."""
    best = steps.argmax(-1)
    keep = np.r_[True, best[1:] != best[:-1]] & (best != blank)
    return [int(c) for c in best[keep]]


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
    if kind == "top1":
        return list((_rows(ref).argmax(-1) == _rows(got).argmax(-1)).astype(float)), []
    if kind in ("ctc", "steps"):
        axis = spec.option("batch_axis") or 0
        units, steps = [], []
        for r, g in zip(_sequences(ref, axis), _sequences(got, axis), strict=True):
            same_steps = r.argmax(-1) == g.argmax(-1)
            steps.append(float(same_steps.mean()) if same_steps.size else 1.0)
            if kind == "ctc":
                blank = spec.option("blank")
                units.append(float(ctc_decode(r, blank) == ctc_decode(g, blank)))
            else:
                units.append(float(same_steps.all()))
        return units, steps
    finite = np.isfinite(ref)
    if kind == "cosine":
        return [_cosine(ref[finite], got[finite])], []
    threshold = spec.option("threshold")
    r, g = ref[finite] > threshold, got[finite] > threshold
    if kind == "binary":
        return list((r == g).astype(float)), []
    union = np.count_nonzero(r | g)
    return [np.count_nonzero(r & g) / union if union else 1.0], []


def score_output(
    name: str, spec: MetricSpec, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> OutputFidelity | str:
    """Score one output over all samples, or return the problem that rejects the candidate."""
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        if ref.shape != got.shape:
            return (
                f"output {name!r} has shape {list(got.shape)} where the original has "
                f"{list(ref.shape)} (sample {i})"
            )
        if got.dtype.kind == "f" and not np.isfinite(got[np.isfinite(ref)]).all():
            return f"output {name!r} contains NaN or Inf (sample {i})"
    units: list[float] = []
    steps: list[float] = []
    try:
        for ref, got in zip(reference, candidate, strict=True):
            sample_units, sample_steps = _units(spec, ref, got)
            units += sample_units
            steps += sample_steps
    except (SlimfleetError, ValueError, IndexError) as exc:
        raise InputError(f"--metric {name}={spec.label()}: {exc}") from None
    scores = np.asarray(units, dtype=np.float64)
    result = OutputFidelity(
        name,
        spec.label(),
        float(scores.mean()) if scores.size else 1.0,
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
        result.cosine = float(np.mean([_cosine(r, c) for r, c in pairs]))
        result.max_abs_error = max(
            float(np.max(np.abs(r.astype(np.float64) - c), initial=0.0)) for r, c in pairs
        )
    return result


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


def metric_specs(
    reference: Sequence[Outputs],
    given: dict[str, MetricSpec] | None = None,
    states: Iterable[str] = (),
) -> dict[str, MetricSpec]:
    """The metric of every output: ``given`` (``--metric``) where set, cosine for the
    ``states`` (see :func:`state_outputs`), else detected from the values.

    A ``given`` name that is not an output is an InputError naming the outputs.
    """
    given = dict(given or {})
    names = list(reference[0]) if reference else []
    unknown = [n for n in given if n not in names]
    if unknown:
        raise InputError(f"--metric {unknown[0]!r}: the model has no such output ({names})")
    states = set(states)
    return {
        n: given.get(n)
        or (MetricSpec("cosine") if n in states else detect([r[n] for r in reference]))
        for n in names
    }


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
