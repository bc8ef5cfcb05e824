"""Confidence functions: how sure a chain tier is of its answer, as one number in [0, 1].

A fallback chain (:mod:`slimfleet.agent.chain`) passes a request on to the next tier when
``function(outputs) < threshold``. A function takes the tier's outputs by name (in the
model's output order) and returns a float; NaN means "cannot tell" and escalates.

The built-ins read the model's **first floating-point output**:

``max_prob``
    class scores ``[C]``, ``[1, C]`` or ``[N, C]``: the maximum class probability (the
    smallest over the ``N`` rows of a batch). Softmax is applied first when the values
    are logits, i.e. not already rows of probabilities (outside [0, 1] or not summing to
    about 1).
``ctc_min_prob``
    sequence scores ``[T, C]``, ``[T, 1, C]`` or ``[1, T, C]`` (CTC recognisers such as
    ddddocr's): the minimum over time steps of the per-step maximum probability, softmax
    first when logits. One unsure character makes the text unsure; the mean over steps is
    useless as a gate (confident blank steps dominate it).
``ctc_min_margin``
    the same shapes: the minimum over time steps of the top-1 minus top-2 probability.
``map_mean_max``
    probability maps (masks, saliency, a detector's text map), any shape: the mean over
    elements of ``max(p, 1 - p)``; the sigmoid is applied first when values lie outside
    [0, 1] (logits).

A user function is given as ``"module:attr"`` (or by a name that agent.yaml's
``confidence_functions:`` maps to one); it is imported once, when the slot is configured.
:func:`function_for_shape` picks a built-in from an output shape where that is
unambiguous, and :func:`check_shape` rejects a shape a built-in cannot read, so a
mismatch is a configuration error rather than a failure on every request.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from slimfleet.agent.errors import ConfigError

Outputs = Mapping[str, np.ndarray]
Confidence = Callable[[Outputs], float]
Shape = Sequence[int | str | None]

PROBABILITY_SUM_TOLERANCE = 1e-3
"""Rows whose values lie in [0, 1] and sum to 1 within this are taken as probabilities."""


def _first_float(outputs: Outputs) -> np.ndarray:
    for value in outputs.values():
        array = np.asarray(value)
        if array.dtype.kind == "f":
            return array
    raise ValueError(f"no floating-point output among {list(outputs)}")


def _top_probabilities(array: np.ndarray, second: bool = False) -> np.ndarray:
    """Per row of the last axis, the top probability (and with ``second``, a second
    column with the runner-up's), softmax first when the rows are not probabilities.

    Works in the array's own float precision (float16 in float32) without a full
    normalised copy: the request pays this on every gated tier."""
    if array.ndim == 0 or array.shape[-1] < 2:
        raise ValueError(f"expected scores over at least 2 classes, got shape {list(array.shape)}")
    rows = array.reshape(-1, array.shape[-1])
    if not len(rows):
        raise ValueError(f"no scores to judge: the output has shape {list(array.shape)}")
    if rows.dtype.itemsize < 4:
        rows = rows.astype(np.float32)
    probabilities = (
        rows.min() >= 0
        and rows.max() <= 1
        and np.allclose(rows.sum(-1, dtype=np.float64), 1.0, atol=PROBABILITY_SUM_TOLERANCE)
    )
    if probabilities:
        weights, total = rows.copy() if second else rows, 1.0
    else:
        weights = np.exp(rows - rows.max(-1, keepdims=True))
        total = weights.sum(-1, dtype=np.float64)
    index = np.arange(len(weights))
    best = weights.argmax(-1)
    top = weights[index, best].astype(np.float64)
    if not second:
        return top / total
    weights[index, best] = -np.inf
    return np.stack([top, weights.max(-1).astype(np.float64)], -1) / np.reshape(total, (-1, 1))


def _squeezed(array: np.ndarray) -> np.ndarray:
    """Without leading size-1 axes, keeping at least the last two."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    return array


def _guarded(array: np.ndarray) -> np.ndarray | None:
    """None when ``array`` holds NaN (the answer cannot be judged: escalate)."""
    return None if np.isnan(array).any() else array


def max_prob(outputs: Outputs) -> float:
    """Class scores ``[C]``, ``[1, C]`` or ``[N, C]``: the (smallest row's) top probability."""
    array = _guarded(_squeezed(_first_float(outputs)))
    if array is None:
        return math.nan
    if array.ndim > 2:
        raise ValueError(f"max_prob expects class scores [N, C], got shape {list(array.shape)}")
    return float(_top_probabilities(array).min())


def _sequence(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[1] == 1:
        array = array[:, 0]  # [T, 1, C], time-major as CTC recognisers export
    elif array.ndim == 3 and array.shape[0] == 1:
        array = array[0]  # [1, T, C]
    if array.ndim != 2:
        raise ValueError(
            f"{name} expects sequence scores [T, C], [T, 1, C] or [1, T, C], "
            f"got shape {list(array.shape)}"
        )
    return array


def ctc_min_prob(outputs: Outputs) -> float:
    """Sequence scores: the minimum over time steps of the per-step top probability."""
    array = _guarded(_sequence(_first_float(outputs), "ctc_min_prob"))
    if array is None:
        return math.nan
    return float(_top_probabilities(array).min())


def ctc_min_margin(outputs: Outputs) -> float:
    """Sequence scores: the minimum over time steps of top-1 minus top-2 probability."""
    array = _guarded(_sequence(_first_float(outputs), "ctc_min_margin"))
    if array is None:
        return math.nan
    top = _top_probabilities(array, second=True)
    return float((top[:, 0] - top[:, 1]).min())


def map_mean_max(outputs: Outputs) -> float:
    """Probability maps: the mean over elements of ``max(p, 1 - p)`` (sigmoid if logits)."""
    array = _guarded(_first_float(outputs).astype(np.float64))
    if array is None:
        return math.nan
    if array.size == 0:
        raise ValueError("map_mean_max got an empty output")
    if array.min() < 0 or array.max() > 1:
        array = 0.5 * (1 + np.tanh(array / 2))  # the sigmoid, without overflow
    return float(np.maximum(array, 1 - array).mean())


BUILTINS: dict[str, Confidence] = {
    "max_prob": max_prob,
    "ctc_min_prob": ctc_min_prob,
    "ctc_min_margin": ctc_min_margin,
    "map_mean_max": map_mean_max,
}


def function_for_shape(shape: Shape) -> str | None:
    """The built-in for an output of this shape, or None when the shape does not decide:
    ``[C]``/``[1, C]`` -> max_prob, ``[T, 1, C]``/``[1, T, C]`` with ``T > 1`` ->
    ctc_min_prob, rank 4 (``[N, 1, H, W]`` maps) -> map_mean_max."""
    dims = list(shape)
    last = dims[-1] if dims else None
    if len(dims) == 4:
        return "map_mean_max"
    if len(dims) in (1, 2) and all(d == 1 for d in dims[:-1]) and last != 1:
        return "max_prob"
    if len(dims) == 3 and 1 in dims[:2] and dims[:2] != [1, 1] and last != 1:
        return "ctc_min_prob"
    return None


def check_shape(function: str, shape: Shape) -> str | None:
    """The problem with giving built-in ``function`` an output of ``shape`` (free dims as
    str or None), or None when it can read it or that cannot be told before running.
    User functions always pass: only running them can tell."""
    dims = list(shape)
    if function not in BUILTINS or function == "map_mean_max":
        return None
    if not dims or dims[-1] == 1:
        return f"{function} needs scores over at least 2 classes, the output is {dims}"
    if function == "max_prob":
        if any(_known_above_one(d) for d in dims[:-2]):
            return f"max_prob needs class scores [N, C], the output is {dims}"
        return None
    sequence = len(dims) == 2 or (
        len(dims) == 3 and not (_known_above_one(dims[0]) and _known_above_one(dims[1]))
    )
    if not sequence:
        return (
            f"{function} needs sequence scores [T, C], [T, 1, C] or [1, T, C], the output is {dims}"
        )
    return None


def _known_above_one(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim > 1


def resolve_confidence(name: str, user_functions: Mapping[str, str] | None = None) -> Confidence:
    """The confidence function called ``name``: a built-in (:data:`BUILTINS`), a name that
    ``user_functions`` (agent.yaml ``confidence_functions:``) maps to ``"module:attr"``, or
    ``"module:attr"`` itself. One that does not import or is not callable is a ConfigError."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"confidence function: expected a name, got {name!r}")
    if name in BUILTINS:
        return BUILTINS[name]
    path = (user_functions or {}).get(name, name)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(BUILTINS)
        raise ConfigError(
            f"confidence function {name!r}: not a built-in ({known}) nor 'module:attr'"
        )
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (Exception, SystemExit) as exc:  # a user module can raise, or exit, on import
        why = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"confidence function {name!r}: cannot import {path}: {type(exc).__name__}: {why}"
        ) from None
    if not callable(target):
        raise ConfigError(f"confidence function {name!r}: {path} is not callable")
    return target
