"""One loaded model: an onnxruntime session, its signature, feed checks, warm-up, smoke test.

A :class:`LoadedModel` is immutable once made and shared freely between threads and
between deployments (an unchanged model is not loaded again for the next deployment).
Its session is dropped when the last deployment holding it is released (garbage
collection; :func:`return_freed_memory` then hands the heap back to the OS).

:func:`load_model` raises :class:`ActivationError` with the stage that failed, named
as in the desired-state outcome of the wire format: ``load`` (onnxruntime refused the
file) or ``smoke_test`` (the warm-up or smoke sample did not fit or run, an output is
missing, NaN/Inf or off the expected values, or the latency budget was exceeded).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.inference import FeedError, ModelIO, TensorSpec
from slimfleet.agent.runtime import open_session
from slimfleet.agent.wire import ModelRef, SmokeTest

log = logging.getLogger(__name__)

# onnxruntime element types -> numpy dtypes.
ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({ort_name})": np.dtype(np_name)
    for ort_name, np_name in {
        "float": "float32",
        "double": "float64",
        "float16": "float16",
        "int8": "int8",
        "int16": "int16",
        "int32": "int32",
        "int64": "int64",
        "uint8": "uint8",
        "uint16": "uint16",
        "uint32": "uint32",
        "uint64": "uint64",
        "bool": "bool",
        "string": "object",
    }.items()
}
SMOKE_RUNS = 3  # timed runs after the warm-up; the median is compared with the budget
STAGE_LOAD = "load"
STAGE_SMOKE = "smoke_test"

try:  # glibc keeps freed heap pages; a released session's arena would stay in RSS
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
    _malloc_trim = None


def return_freed_memory() -> None:
    """Hand the heap pages released sessions freed back to the OS."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class ActivationError(SlimfleetError):
    """Loading or smoke-testing a model failed at ``stage`` (``load`` or ``smoke_test``)."""

    def __init__(self, ref: ModelRef, stage: str, reason: str) -> None:
        super().__init__(f"{ref}: {stage} failed: {reason}")
        self.ref = ref
        self.stage = stage
        self.reason = reason


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _spec(arg: Any) -> TensorSpec:
    return TensorSpec(arg.name, ORT_DTYPES.get(arg.type, np.dtype(object)), tuple(arg.shape))


class LoadedModel:
    """One model version loaded in onnxruntime; thread-safe (session.run is)."""

    def __init__(self, ref: ModelRef, session: ort.InferenceSession) -> None:
        self.ref = ref
        self.label = str(ref)
        self._session = session
        self.io = ModelIO(
            tuple(_spec(a) for a in session.get_inputs()),
            tuple(_spec(a) for a in session.get_outputs()),
        )
        self.output_names = [s.name for s in self.io.outputs]

    def check_feeds(self, feeds: Any, cast: bool) -> dict[str, np.ndarray]:
        """The feeds as onnxruntime wants them, or FeedError saying what is wrong."""
        if not isinstance(feeds, Mapping):
            raise FeedError(f"feeds must map input names to arrays, got {type(feeds).__name__}")
        specs = self.io.inputs
        if len(feeds) != len(specs) or any(s.name not in feeds for s in specs):
            expected = ", ".join(repr(s.name) for s in specs)
            got = ", ".join(repr(k) for k in feeds) or "none"
            raise FeedError(f"{self.ref} expects inputs {expected}; got {got}")
        return {spec.name: _check_feed(spec, feeds[spec.name], cast) for spec in specs}

    def zeros(self) -> dict[str, np.ndarray] | None:
        """Zeros of every input's shape, or None when a dimension is free."""
        feeds = {}
        for spec in self.io.inputs:
            shape = spec.fixed_shape()
            if shape is None or spec.dtype == np.dtype(object):
                return None
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name on checked feeds; onnxruntime's exceptions pass through."""
        values = self._session.run(self.output_names, feeds)
        return dict(zip(self.output_names, values, strict=True))


def _check_feed(spec: TensorSpec, value: Any, cast: bool) -> np.ndarray:
    if cast:
        try:
            value = np.asarray(value, dtype=spec.dtype)
        except (TypeError, ValueError) as exc:
            raise FeedError(
                f"input {spec.name!r}: cannot make a {spec.dtype} array: {first_line(exc)}"
            ) from None
    elif not isinstance(value, np.ndarray):
        raise FeedError(f"input {spec.name!r}: expected a numpy array, got {type(value).__name__}")
    if value.dtype != spec.dtype:
        raise FeedError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {value.dtype}")
    if value.ndim != len(spec.shape) or any(
        isinstance(want, int) and want != got
        for want, got in zip(spec.shape, value.shape, strict=True)
    ):
        shape = [d if isinstance(d, int) else (d or "?") for d in spec.shape]
        raise FeedError(f"input {spec.name!r}: expected shape {shape}, got {list(value.shape)}")
    return value


def load_model(
    ref: ModelRef,
    path: Path,
    *,
    threads: int = 1,
    smoke: SmokeTest | None = None,
    max_latency_ms: float | None = None,
) -> tuple[LoadedModel, dict[str, Any]]:
    """Load ``ref`` from ``path``, warm it up (on the smoke sample, or zeros) and check it.

    With ``smoke`` the outputs must match within its tolerance. The latency budget is
    the smaller of ``max_latency_ms`` (the device's) and ``smoke.max_latency_ms`` (the
    publisher's), compared with the median of ``SMOKE_RUNS`` timed runs. Returns the
    model and its timings ``{"load_ms", "smoke_ms"}``; raises ActivationError.
    """
    started = time.perf_counter()
    try:
        session = open_session(path, threads, log_severity=4)
    except Exception as exc:  # onnxruntime raises plain Exception subclasses
        raise ActivationError(ref, STAGE_LOAD, first_line(exc)) from None
    model = LoadedModel(ref, session)
    load_ms = (time.perf_counter() - started) * 1000
    budgets = [b for b in (max_latency_ms, smoke and smoke.max_latency_ms) if b]
    latency_ms = _smoke_test(model, smoke, timed=bool(budgets))
    if budgets and latency_ms is not None and latency_ms > min(budgets):
        raise ActivationError(
            ref,
            STAGE_SMOKE,
            f"smoke-test latency {latency_ms:.3g} ms is over the budget of {min(budgets):g} ms",
        )
    timings = {"load_ms": round(load_ms, 3), "smoke_ms": _round(latency_ms)}
    return model, timings


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _smoke_test(model: LoadedModel, smoke: SmokeTest | None, *, timed: bool) -> float | None:
    """Run the smoke sample (or zeros) once, plus timed runs; return the median in ms.

    Returns None when there was nothing to run (free input dimensions, no sample).
    """
    fail = lambda reason: ActivationError(model.ref, STAGE_SMOKE, reason)  # noqa: E731
    if smoke is not None:
        try:
            feeds = model.check_feeds(smoke.inputs, cast=False)
        except FeedError as exc:
            raise fail(f"the smoke sample does not fit: {exc}") from None
        missing = sorted(set(smoke.outputs) - set(model.output_names))
        if missing:
            raise fail(f"the model has no output {', '.join(missing)}")
    else:
        zeros = model.zeros()
        if zeros is None:
            return None
        feeds = zeros
    timings = []
    for _ in range(1 + (SMOKE_RUNS if timed else 0)):
        began = time.perf_counter()
        try:
            outputs = model.run(feeds)
        except Exception as exc:  # onnxruntime raises plain Exception subclasses
            raise fail(f"the model failed to run: {first_line(exc)}") from None
        timings.append((time.perf_counter() - began) * 1000)
    if smoke is not None:
        reason = compare_outputs(outputs, smoke)
        if reason is not None:
            raise fail(reason)
    return float(np.median(timings[1:] or timings))


def compare_outputs(outputs: dict[str, np.ndarray], smoke: SmokeTest) -> str | None:
    """Why ``outputs`` fail the smoke test (NaN/Inf, shape, values), or None."""
    for name, value in outputs.items():
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            return f"output {name!r} contains NaN or Inf"
    for name, expected in smoke.outputs.items():
        got = outputs[name]
        if got.shape != expected.shape:
            return f"output {name!r} has shape {list(got.shape)}, expected {list(expected.shape)}"
        if np.issubdtype(expected.dtype, np.number) and np.issubdtype(got.dtype, np.number):
            if not np.allclose(got, expected, atol=smoke.atol, rtol=smoke.rtol):
                error = float(np.max(np.abs(got.astype(np.float64) - expected)))
                return (
                    f"output {name!r} differs from the expected by up to {error:.3g} "
                    f"(atol {smoke.atol:g}, rtol {smoke.rtol:g})"
                )
        elif not np.array_equal(got, expected):
            return f"output {name!r} differs from the expected"
    return None


ort.set_default_logger_severity(4)  # failures are raised, not logged
