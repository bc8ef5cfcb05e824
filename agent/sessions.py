"""The model server: onnxruntime sessions loaded beside each other, smoke-tested, swapped.

:class:`Serving` holds the session that serves requests. A new version is loaded and
smoke-tested off the request path while the old one keeps serving; the swap is one
assignment under a lock, so a request runs on whichever session was current when it
started and finishes there. The replaced session stays loaded during a *watch window*;
if the new one's error rate or p95 latency regresses against the old one's recent
figures, serving switches back by itself. A session is released once its in-flight
requests have drained.

Events (dicts handed to ``on_event``; the daemon adds the device id and publishes them
on ``devices/<id>/events``). ``model`` and ``from``/``to`` are ``{"name", "version"}``
or null, ``ts`` is Unix time::

    {"type": "swap_started", "ts", "model", "from"}
    {"type": "swap_ok",      "ts", "model", "from", "load_ms", "smoke_ms", "total_ms"}
    {"type": "swap_failed",  "ts", "model", "from", "stage", "reason"}
    {"type": "fallback",     "ts", "model", "to", "stage", "reason"}

``stage`` is ``load``, ``warmup``, ``smoke`` or ``latency`` for a failed activation,
``watch`` when the watch window switched back, ``rollback`` for :meth:`Serving.rollback`.
In ``fallback``, ``model`` is the version given up and ``to`` the one serving now.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.inference import FeedError, InferenceError, ModelIO, NoModelError, TensorSpec
from slimfleet.agent.runtime import open_session
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.wire import (
    EVENT_FALLBACK,
    EVENT_SWAP_FAILED,
    EVENT_SWAP_OK,
    EVENT_SWAP_STARTED,
    ModelRef,
    SmokeTest,
)

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
RECENT_SAMPLES = 2048  # per session, for the watch window
DRAIN_TIMEOUT_S = 60.0
WATCH_TICK_S = 0.1


try:  # glibc keeps freed heap pages; a released session's arena would stay in RSS
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
    _malloc_trim = None


def _return_freed_memory() -> None:
    """Hand the heap pages a released session freed back to the OS."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class SwapError(SlimfleetError):
    """Loading or smoke-testing a new model failed; the old one is still serving."""

    def __init__(self, ref: ModelRef, stage: str, reason: str) -> None:
        super().__init__(f"{ref}: {stage} failed: {reason}")
        self.ref = ref
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class WatchPolicy:
    """When to switch back after a swap.

    For ``window_s`` seconds after a swap the previous session stays loaded. Once the
    new model has served ``min_requests`` requests, it is abandoned if its error rate
    exceeds the previous model's recent rate by more than ``max_error_rate``, or its
    p95 latency exceeds ``max_p95_ratio`` times the previous model's recent p95 (when
    the previous model served at least ``min_requests`` requests itself).
    ``window_s=0`` turns the watch off.
    """

    window_s: float = 30.0
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_p95_ratio: float = 1.5


def _spec(arg: Any) -> TensorSpec:
    dtype = ORT_DTYPES.get(arg.type, np.dtype(object))
    return TensorSpec(arg.name, dtype, tuple(arg.shape))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _Failure(Exception):
    """Internal: a stage of an activation failed."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class _Loaded:
    """One loaded session with its signature, in-flight count and recent outcomes."""

    def __init__(self, ref: ModelRef, path: Path, session: ort.InferenceSession) -> None:
        self.ref = ref
        self.path = path
        self.session: ort.InferenceSession | None = session
        self.io = ModelIO(
            tuple(_spec(a) for a in session.get_inputs()),
            tuple(_spec(a) for a in session.get_outputs()),
        )
        self.output_names = [s.name for s in self.io.outputs]
        self.inflight = 0
        self.retired = False
        # Latency in seconds of recent requests; -1.0 marks a failed one.
        self.recent: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self.sample: dict[str, np.ndarray] | None = None  # the inputs it was warmed up on

    def check_feeds(self, feeds: Any, cast: bool) -> dict[str, np.ndarray]:
        """The feeds as onnxruntime wants them, or FeedError saying what is wrong."""
        if not isinstance(feeds, Mapping):
            raise FeedError(f"feeds must map input names to arrays, got {type(feeds).__name__}")
        specs = self.io.inputs
        if len(feeds) != len(specs) or any(s.name not in feeds for s in specs):
            expected = ", ".join(repr(s.name) for s in specs)
            got = ", ".join(repr(k) for k in feeds) or "none"
            raise FeedError(f"{self.ref} expects inputs {expected}; got {got}")
        ready = {}
        for spec in specs:
            value = feeds[spec.name]
            if cast:
                try:
                    value = np.asarray(value, dtype=spec.dtype)
                except (TypeError, ValueError) as exc:
                    raise FeedError(
                        f"input {spec.name!r}: cannot make a {spec.dtype} array: {_first_line(exc)}"
                    ) from None
            elif not isinstance(value, np.ndarray):
                raise FeedError(
                    f"input {spec.name!r}: expected a numpy array, got {type(value).__name__}"
                )
            if value.dtype != spec.dtype:
                raise FeedError(
                    f"input {spec.name!r}: expected dtype {spec.dtype}, got {value.dtype}"
                )
            if value.ndim != len(spec.shape) or any(
                isinstance(want, int) and want != got
                for want, got in zip(spec.shape, value.shape, strict=True)
            ):
                shape = [d if isinstance(d, int) else (d or "?") for d in spec.shape]
                raise FeedError(
                    f"input {spec.name!r}: expected shape {shape}, got {list(value.shape)}"
                )
            ready[spec.name] = value
        return ready

    def sample_feeds(self) -> dict[str, np.ndarray] | None:
        """Zeros of every input's shape, or None when a dimension is free."""
        feeds = {}
        for spec in self.io.inputs:
            shape = spec.fixed_shape()
            if shape is None or spec.dtype == np.dtype(object):
                return None
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.session is not None
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))


@dataclass
class _Watch:
    """The watch window of one swap: ``new`` serves, ``old`` is the fallback."""

    new: _Loaded
    old: _Loaded
    started: float
    base_error_rate: float
    base_p95: float | None


def _ref_dict(ref: ModelRef | None) -> dict[str, Any] | None:
    return ref.to_dict() if ref else None


class Serving:
    """Serves one model at a time and swaps versions without failing a request.

    ``on_event(event)`` receives every event (see the module docstring);
    ``on_fallback(from_ref, to_ref, reason)`` is called whenever serving switched back
    to an older model by itself or through :meth:`rollback` (persist the state there);
    ``on_settled(ref)`` when a swapped-in model survived its watch window (it is now
    the last good one). Callbacks run in the thread that made the change; their
    exceptions are logged, never raised.
    """

    def __init__(
        self,
        threads: int = 1,
        watch: WatchPolicy | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_fallback: Callable[[ModelRef, ModelRef | None, str], None] | None = None,
        on_settled: Callable[[ModelRef], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.watch_policy = watch or WatchPolicy()
        self.telemetry = telemetry or Telemetry()
        self._on_event = on_event
        self._on_fallback = on_fallback
        self._on_settled = on_settled
        # _lock guards _active and the in-flight counts (held for a few instructions per
        # request); _swap_lock serializes changes of _active/_standby/_watch;
        # _activate_lock serializes the long operations (load, smoke test).
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._swap_lock = threading.Lock()
        self._activate_lock = threading.Lock()
        self._active: _Loaded | None = None
        self._standby: _Loaded | None = None
        self._previous: _Loaded | None = None  # what rollback() returns to (maybe released)
        self._watch: _Watch | None = None
        self._wake = threading.Event()
        self._watcher: threading.Thread | None = None
        self._releasers: list[threading.Thread] = []  # replaced sessions draining
        self._closed = False
        ort.set_default_logger_severity(4)  # failures are raised, not logged

    # -- requests -------------------------------------------------------------------

    @property
    def current(self) -> ModelRef | None:
        """The model new requests go to."""
        active = self._active
        return active.ref if active else None

    @property
    def previous(self) -> ModelRef | None:
        """The model :meth:`rollback` would switch back to, if any."""
        with self._swap_lock:
            if self._standby is not None:
                return self._standby.ref
            return self._previous.ref if self._previous else None

    @property
    def io(self) -> ModelIO | None:
        """The signature of the current model."""
        active = self._active
        return active.io if active else None

    def infer(self, feeds: Mapping[str, Any], *, cast: bool = False) -> dict[str, np.ndarray]:
        """Run the current model on ``feeds`` and return its outputs by name.

        ``cast=True`` converts each feed (array or nested list) to the input's dtype
        first; otherwise a wrong dtype is an error. Raises NoModelError, FeedError or
        InferenceError. Thread-safe.
        """
        return self.predict(feeds, cast=cast)[1]

    def predict(
        self, feeds: Mapping[str, Any], *, cast: bool = False
    ) -> tuple[ModelRef, dict[str, np.ndarray]]:
        """Like :meth:`infer`, and also say which model answered."""
        with self._lock:
            loaded = self._active
            if loaded is not None:
                loaded.inflight += 1
                session = loaded.session
        if loaded is None:
            self.telemetry.record_error()
            raise NoModelError("no model is loaded")
        start = time.perf_counter()
        try:
            ready = loaded.check_feeds(feeds, cast)
            try:
                values = session.run(loaded.output_names, ready)  # type: ignore[union-attr]
            except Exception as exc:  # onnxruntime raises plain Exception subclasses
                raise InferenceError(
                    f"{loaded.ref}: inference failed: {_first_line(exc)}"
                ) from None
        except SlimfleetError:
            loaded.recent.append(-1.0)
            self.telemetry.record_error()
            raise
        else:
            latency = time.perf_counter() - start
            loaded.recent.append(latency)
            self.telemetry.record(latency)
            return loaded.ref, dict(zip(loaded.output_names, values, strict=True))
        finally:
            with self._lock:
                loaded.inflight -= 1
                if loaded.retired and not loaded.inflight:
                    self._drained.notify_all()

    # -- changing the model -----------------------------------------------------------

    def start(
        self, ref: ModelRef, path: Path, warmup: Mapping[str, np.ndarray] | None = None
    ) -> None:
        """Load ``ref`` and serve it at once, without smoke test or watch window.

        Meant for startup with the last good model. ``warmup`` are inputs to run once
        before serving (e.g. the stored manifest's smoke-test inputs); without them
        the model is warmed up on zeros when all its input dimensions are fixed.
        Raises SwapError when it cannot be loaded or fails its warm-up (whatever
        served before keeps serving).
        """
        with self._activate_lock:
            self._check_open()
            try:
                loaded = self._load(ref, path)
                self._warm_up(loaded, None, warmup)
            except _Failure as failure:
                raise SwapError(ref, failure.stage, failure.reason) from None
            self._swap_in(loaded, watch=False)
            log.info("serving %s from %s", ref, path)

    def activate(
        self,
        ref: ModelRef,
        path: Path,
        smoke: SmokeTest | None = None,
        max_latency_ms: float | None = None,
    ) -> dict[str, Any]:
        """Load ``ref`` beside the serving model, smoke-test it, swap, and watch it.

        The latency budget is the smaller of ``max_latency_ms`` (the device's) and
        ``smoke.max_latency_ms`` (the publisher's), compared with the median of
        timed runs after a warm-up. Without a smoke sample the model is warmed up on
        zeros when all its input dimensions are fixed. Returns the ``swap_ok`` event.
        On failure emits ``swap_failed`` and ``fallback`` and raises SwapError;
        the model that was serving keeps serving.
        """
        with self._activate_lock:
            self._check_open()
            before = self.current
            self._emit(EVENT_SWAP_STARTED, ref, **{"from": _ref_dict(before)})
            budgets = [b for b in (max_latency_ms, smoke and smoke.max_latency_ms) if b]
            started = time.perf_counter()
            try:
                loaded = self._load(ref, path)
                loaded_at = time.perf_counter()
                latency_ms = self._warm_up(loaded, smoke, timed=bool(budgets))
                if budgets and latency_ms is not None and latency_ms > min(budgets):
                    raise _Failure(
                        "latency",
                        f"smoke-test latency {latency_ms:.3g} ms is over the budget of "
                        f"{min(budgets):g} ms",
                    )
            except _Failure as failure:
                self._emit(
                    EVENT_SWAP_FAILED,
                    ref,
                    stage=failure.stage,
                    reason=failure.reason,
                    **{"from": _ref_dict(before)},
                )
                self._emit(
                    EVENT_FALLBACK,
                    ref,
                    to=_ref_dict(self.current),
                    stage=failure.stage,
                    reason=failure.reason,
                )
                log.warning("%s: %s failed: %s", ref, failure.stage, failure.reason)
                raise SwapError(ref, failure.stage, failure.reason) from None
            replaced = self._swap_in(loaded, watch=True)
            done = time.perf_counter()
            log.info("swapped to %s", ref)
            return self._emit(
                EVENT_SWAP_OK,
                ref,
                load_ms=round((loaded_at - started) * 1000, 3),
                smoke_ms=round(latency_ms, 3) if latency_ms is not None else None,
                total_ms=round((done - started) * 1000, 3),
                **{"from": _ref_dict(replaced)},
            )

    def rollback(self, reason: str = "rollback requested") -> ModelRef:
        """Switch back to the previous model now; return the model serving after it.

        Uses the still-loaded previous session during a watch window, otherwise
        loads the previous model's file again. Emits ``fallback`` (stage
        ``rollback``) and calls ``on_fallback``. Raises SlimfleetError when there is
        nothing to go back to, SwapError when the previous model cannot be loaded.
        """
        with self._activate_lock:
            self._check_open()
            with self._swap_lock:
                target, previous = self._standby, self._previous
                self._watch = None  # the watch thread must not settle or release the standby
            if target is None:
                if previous is None:
                    raise SlimfleetError("no previous model to roll back to")
                try:
                    target = self._load(previous.ref, previous.path)
                    self._warm_up(target, None, previous.sample)
                except _Failure as failure:
                    raise SwapError(previous.ref, failure.stage, failure.reason) from None
            self._switch_back(target, "rollback", reason, expected=None)
            return target.ref

    def close(self) -> None:
        """Stop serving and release every session; later requests raise NoModelError."""
        with self._activate_lock, self._swap_lock:
            self._closed = True
            self._watch = None
            with self._lock:
                released = [s for s in (self._active, self._standby) if s is not None]
                self._active = self._standby = None
            self._previous = None
        self.telemetry.set_model(None)
        self._wake.set()
        self.drained()
        for loaded in released:
            self._release(loaded)
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SlimfleetError("the model server is closed")

    def _load(self, ref: ModelRef, path: Path) -> _Loaded:
        try:
            session = open_session(path, self.threads, log_severity=4)
        except Exception as exc:  # onnxruntime raises plain Exception subclasses
            raise _Failure("load", _first_line(exc)) from None
        return _Loaded(ref, Path(path), session)

    def _warm_up(
        self,
        loaded: _Loaded,
        smoke: SmokeTest | None,
        sample: Mapping[str, np.ndarray] | None = None,
        *,
        timed: bool = False,
    ) -> float | None:
        """Warm up on the smoke test, ``sample`` or zeros; return its latency in ms.

        With ``timed`` (a latency budget applies) the warm-up run is followed by
        ``SMOKE_RUNS`` timed runs and their median is returned; otherwise the one
        warm-up run is all, so a swap costs no more than a load plus one inference.
        Returns None when there was nothing to run (free input dimensions, no sample).
        """
        stage = "smoke" if smoke else "warmup"
        given = smoke.inputs if smoke is not None else sample
        if given is not None:
            try:
                feeds = loaded.check_feeds(given, cast=False)
            except FeedError as exc:
                raise _Failure(stage, f"{stage} sample does not fit: {exc}") from None
        else:
            feeds = loaded.sample_feeds()
            if feeds is None:
                return None
        if smoke is not None:
            missing = sorted(set(smoke.outputs) - set(loaded.output_names))
            if missing:
                raise _Failure("smoke", f"the model has no output {', '.join(missing)}")
        loaded.sample = feeds
        timings = []
        for _ in range(1 + (SMOKE_RUNS if timed else 0)):
            began = time.perf_counter()
            try:
                outputs = loaded.run(feeds)
            except Exception as exc:  # onnxruntime raises plain Exception subclasses
                raise _Failure(stage, f"the model failed to run: {_first_line(exc)}") from None
            timings.append((time.perf_counter() - began) * 1000)
        if smoke is not None:
            _compare(outputs, smoke)
        return float(np.median(timings[1:] or timings))

    def _swap_in(self, new: _Loaded, *, watch: bool) -> ModelRef | None:
        """Make ``new`` current; keep the replaced one as standby when watching."""
        policy = self.watch_policy
        with self._swap_lock:
            with self._lock:
                old, self._active = self._active, new
            self.telemetry.set_model(new.ref)
            release = [self._standby] if self._standby is not None else []
            self._standby, self._watch = None, None
            if old is not None:
                self._previous = old
                if watch and policy.window_s > 0:
                    self._standby = old
                    self._watch = self._start_watch(new, old)
                    self._wake.set()
                else:
                    release.append(old)
        if release:  # off the swap's path: the new model already serves
            self._release_later(release)
        return old.ref if old else None

    def _switch_back(
        self, target: _Loaded, stage: str, reason: str, expected: _Watch | None
    ) -> bool:
        """Serve ``target`` instead of the current model; False if ``expected`` went stale."""
        with self._swap_lock:
            if expected is not None and self._watch is not expected:
                return False
            with self._lock:
                bad, self._active = self._active, target
            self.telemetry.set_model(target.ref)
            release = [s for s in (bad, self._standby) if s is not None and s is not target]
            self._standby, self._watch, self._previous = None, None, None
        for loaded in release:
            self._release(loaded)
        bad_ref = bad.ref if bad else target.ref
        log.warning("fell back from %s to %s: %s", bad_ref, target.ref, reason)
        self._emit(EVENT_FALLBACK, bad_ref, to=target.ref.to_dict(), stage=stage, reason=reason)
        self._call(self._on_fallback, bad_ref, target.ref, reason)
        return True

    def _release_later(self, sessions: list[_Loaded]) -> None:
        """Drain and drop ``sessions`` on a thread; :meth:`close` and :meth:`drained` wait."""
        thread = threading.Thread(
            target=lambda: [self._release(s) for s in sessions], name="release", daemon=True
        )
        with self._lock:
            self._releasers = [t for t in self._releasers if t.is_alive()] + [thread]
        thread.start()

    def drained(self, timeout: float | None = None) -> bool:
        """Wait until every replaced session has been released; False on timeout."""
        with self._lock:
            pending = list(self._releasers)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in pending:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in pending)

    def _release(self, loaded: _Loaded) -> None:
        """Wait until no request runs on ``loaded``, then drop its session."""
        with self._lock:
            loaded.retired = True
            if not self._drained.wait_for(lambda: not loaded.inflight, timeout=DRAIN_TIMEOUT_S):
                log.warning(
                    "%s: %d requests still running after %.0f s; releasing anyway "
                    "(they keep their session alive until they finish)",
                    loaded.ref,
                    loaded.inflight,
                    DRAIN_TIMEOUT_S,
                )
            loaded.session = None
        _return_freed_memory()

    # -- watch window -----------------------------------------------------------------

    def _start_watch(self, new: _Loaded, old: _Loaded) -> _Watch:
        policy = self.watch_policy
        samples = np.array(old.recent.copy(), dtype=np.float64)
        base_error_rate, base_p95 = 0.0, None
        if samples.size >= policy.min_requests:
            base_error_rate = float((samples < 0).mean())
            ok = samples[samples >= 0]
            if ok.size >= policy.min_requests:
                base_p95 = float(np.percentile(ok, 95))
        watch = _Watch(new, old, time.monotonic(), base_error_rate, base_p95)
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch_loop, name="slimfleet-watch", daemon=True
            )
            self._watcher.start()
        return watch

    def _watch_loop(self) -> None:
        while not self._closed:
            watch = self._watch
            if watch is None:
                self._wake.wait()
            else:
                try:
                    self._check_watch(watch)
                except Exception:  # a bug here must not stop future watches
                    log.exception("watch window check failed")
                self._wake.wait(WATCH_TICK_S)
            self._wake.clear()

    def _check_watch(self, watch: _Watch) -> None:
        reason = self._regression(watch)
        if reason is not None:
            self._switch_back(watch.old, "watch", reason, expected=watch)
        elif time.monotonic() - watch.started >= self.watch_policy.window_s:
            with self._swap_lock:
                if self._watch is not watch:
                    return
                self._watch, self._standby = None, None
            self._release(watch.old)
            log.info("%s passed its watch window", watch.new.ref)
            self._call(self._on_settled, watch.new.ref)

    def _regression(self, watch: _Watch) -> str | None:
        """Why the new model is worse than the old one, or None."""
        policy = self.watch_policy
        samples = np.array(watch.new.recent.copy(), dtype=np.float64)
        if samples.size < policy.min_requests:
            return None
        error_rate = float((samples < 0).mean())
        if error_rate - watch.base_error_rate > policy.max_error_rate:
            return (
                f"error rate {error_rate:.1%} over {samples.size} requests vs "
                f"{watch.base_error_rate:.1%} before (allowed +{policy.max_error_rate:.1%})"
            )
        ok = samples[samples >= 0]
        if watch.base_p95 is not None and ok.size >= policy.min_requests:
            p95 = float(np.percentile(ok, 95))
            if p95 > policy.max_p95_ratio * watch.base_p95:
                return (
                    f"p95 latency {p95 * 1000:.3g} ms vs {watch.base_p95 * 1000:.3g} ms "
                    f"before (allowed x{policy.max_p95_ratio:g})"
                )
        return None

    # -- events -----------------------------------------------------------------------

    def _emit(self, kind: str, ref: ModelRef, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "ts": time.time(), "model": ref.to_dict(), **fields}
        self.telemetry.count_event(event)
        self._call(self._on_event, event)
        return event

    @staticmethod
    def _call(callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            log.exception("callback %r failed", callback)


def _compare(outputs: dict[str, np.ndarray], smoke: SmokeTest) -> None:
    """Raise _Failure unless every output is finite and within tolerance of the expected."""
    for name, value in outputs.items():
        if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
            raise _Failure("smoke", f"output {name!r} contains NaN or Inf")
    for name, expected in smoke.outputs.items():
        got = outputs[name]
        if got.shape != expected.shape:
            raise _Failure(
                "smoke",
                f"output {name!r} has shape {list(got.shape)}, expected {list(expected.shape)}",
            )
        if np.issubdtype(expected.dtype, np.number) and np.issubdtype(got.dtype, np.number):
            if not np.allclose(got, expected, atol=smoke.atol, rtol=smoke.rtol):
                error = float(np.max(np.abs(got.astype(np.float64) - expected)))
                raise _Failure(
                    "smoke",
                    f"output {name!r} differs from the expected by up to {error:.3g} "
                    f"(atol {smoke.atol:g}, rtol {smoke.rtol:g})",
                )
        elif not np.array_equal(got, expected):
            raise _Failure("smoke", f"output {name!r} differs from the expected")
