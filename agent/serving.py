"""Serving a deployment: named slots of loaded models, switched as a whole in one step.

:class:`DeploymentServer` implements :class:`slimfleet.agent.inference.InferenceBackend`.
A new deployment is loaded and smoke-tested beside the serving one (models it shares
with the serving deployment are reused, not loaded again), then the whole set becomes
current in one assignment under the server's lock. A request takes the set that is
current when it starts and finishes on it, so no request ever sees slots of two
deployments. With a watch window, the replaced set stays loaded as the standby and
:mod:`slimfleet.agent.watch` decides, from each slot's recent requests, whether to
switch back to it. A replaced set is released on ONE path (:meth:`_retire`): a
background thread waits until its in-flight requests have drained, so neither a swap
nor the activation lock ever waits for a drain.

Events (dicts handed to ``on_event``; the daemon adds the device id and desired seq)::

    {"type": "swap_started", "ts", "slot": null, "model": null, "deployment", "from"}
    {"type": "swap_ok", ..., "deployment", "from", "load_ms", "smoke_ms", "total_ms"}
    {"type": "swap_failed", ..., "slot", "model", "deployment", "stage", "reason"}
    {"type": "tier_skipped", ..., "slot", "model", "stage", "reason"}
    {"type": "fallback", ..., "deployment" (given up), "to", "stage": "watch", "reason"}

``deployment``/``from``/``to`` are ``{slot: [{"name", "version"}, ...loaded tiers]}``.
A slot's remote tier adds ``tier_failing``/``tier_recovered`` (``slot``, ``reason``).

Bounds: at most three serving sets are alive besides the ones draining (serving,
standby, loading); a draining set is dropped after ``DRAIN_TIMEOUT_S`` even if a request
still runs on it (that request keeps its sessions alive until it ends); each slot keeps
its last ``slots.RECENT_SAMPLES`` request outcomes for the watch window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimfleet.agent.deployment import Deployment
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.inference import (
    Answer,
    ModelIO,
    NoModelError,
    UnknownSlotError,
)
from slimfleet.agent.report import tiers
from slimfleet.agent.sessions import (
    ActivationError,
    LoadedModel,
    load_model,
    return_freed_memory,
)
from slimfleet.agent.slots import AnsweredShapes, Loaded, Pinned, ServingSet, Slot, build_slot
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.watch import Baseline, WatchPolicy, baseline, judge
from slimfleet.agent.wire import (
    EVENT_FALLBACK,
    EVENT_SWAP_FAILED,
    EVENT_SWAP_OK,
    EVENT_SWAP_STARTED,
    EVENT_TIER_SKIPPED,
    ModelRef,
    SmokeTest,
)

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0  # a release waits this long for in-flight requests, then drops anyway
WATCH_TICK_S = 0.1


@dataclass(frozen=True)
class ModelSource:
    """Where an installed, verified model is and what its manifest asks of it."""

    path: Path
    smoke: SmokeTest | None = None


class DeploymentError(SlimfleetError):
    """A deployment could not be activated; whatever served before still serves."""

    def __init__(self, slot: str, ref: ModelRef, stage: str, reason: str) -> None:
        super().__init__(f"slot {slot}: {ref}: {stage} failed: {reason}")
        self.slot, self.ref, self.stage, self.reason = slot, ref, stage, reason


@dataclass(frozen=True)
class _Watch:
    """The watch window of one swap: ``new`` serves, ``old`` is the standby."""

    new: ServingSet
    old: ServingSet
    started: float
    bases: dict[str, Baseline]


class DeploymentServer:
    """Serves one deployment at a time and switches deployments without failing a request.

    ``on_event(event)`` receives every event (module docstring); ``on_fallback(bad,
    to, reason)`` is called when the watch window switched back (``bad``/``to`` are
    the deployment specs); ``on_settled(spec)`` when a deployment survived its watch
    window. ``confidence_functions`` (agent.yaml) name the functions a gate may use.
    Callbacks run on the thread that made the change, outside every lock;
    their exceptions are logged, never raised.
    """

    def __init__(
        self,
        threads: int = 1,
        watch: WatchPolicy | None = None,
        telemetry: Telemetry | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_fallback: Callable[[Deployment, Deployment, str], None] | None = None,
        on_settled: Callable[[Deployment], None] | None = None,
        confidence_functions: Mapping[str, str] | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.watch_policy = watch or WatchPolicy()
        self.confidence_functions = dict(confidence_functions or {})
        self.telemetry = telemetry or Telemetry()
        self._shapes = AnsweredShapes()  # across deployments: see AnsweredShapes
        self._on_event = on_event
        self._on_fallback = on_fallback
        self._on_settled = on_settled
        #: Guards _active, _standby, _watch, _releasers, _closed and every set's
        #: inflight/retired. Held for a few instructions only: never while loading,
        #: running a model or draining (the drain waits on _drained, which releases it).
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        #: Serializes activate() and close() (the slow part: loading, smoke tests). It
        #: guards no field; holding it never waits for a drain.
        self._activate_lock = threading.Lock()
        self._active: ServingSet | None = None
        self._standby: ServingSet | None = None
        self._watch: _Watch | None = None
        self._releasers: list[threading.Thread] = []
        self._closed = False
        self._wake = threading.Event()
        self._watcher = threading.Thread(target=self._watch_loop, name="watch", daemon=True)
        self._watcher.start()

    # -- InferenceBackend -----------------------------------------------------------

    def slots(self) -> list[str]:
        with self._lock:
            active = self._active
        return sorted(active.slots) if active else []

    def _slot(self, slot: str) -> Slot:
        with self._lock:
            active = self._active
        if active is None:
            raise NoModelError("no deployment is serving yet")
        found = active.slots.get(slot)
        if found is None:
            raise UnknownSlotError(f"no slot {slot!r} in the deployment serving now")
        return found

    def slot_io(self, slot: str) -> ModelIO:
        return self._slot(slot).io

    def slot_model(self, slot: str) -> ModelRef:
        return self._slot(slot).primary.ref

    def ready(self) -> bool:
        with self._lock:
            return self._active is not None

    def current(self) -> Loaded | None:
        """What serves now: ``{slot: [loaded tier refs]}``, or None before any deployment."""
        with self._lock:
            active = self._active
        return active.loaded() if active else None

    def predict(self, slot: str, feeds: Mapping[str, Any], *, cast: bool = False) -> Answer:
        """Run ``slot`` of the deployment current when the request starts, to the end.

        Only InferenceError counts against the model (telemetry errors, watch window);
        the front door reports a FeedError or UnknownSlotError through
        :meth:`client_error` (it is counted nowhere else).
        """
        with self.pinned() as serving:
            return serving.predict(slot, feeds, cast=cast)

    @contextmanager
    def pinned(self) -> Iterator[Pinned]:
        """The deployment serving now, held for several requests: the steps of one
        pipeline run all on the same deployment even if it is replaced meanwhile.
        Raises NoModelError before the first deployment."""
        with self._lock:
            active = self._active
            if active is not None:
                active.inflight += 1
        if active is None:
            raise NoModelError("no deployment is serving yet")
        try:
            yield Pinned(active, self.telemetry, self._shapes)
        finally:
            with self._lock:
                active.inflight -= 1
                if active.retired and not active.inflight:
                    self._drained.notify_all()

    def client_error(self, slot: str | None) -> None:
        self.telemetry.client_error(slot)

    def metrics_text(self) -> bytes:
        return self.telemetry.metrics_text()

    # -- changing the deployment ------------------------------------------------------

    def activate(
        self,
        spec: Deployment,
        sources: Mapping[ModelRef, ModelSource],
        *,
        watch: bool = True,
        max_latency_ms: float | None = None,
    ) -> dict[str, Any]:
        """Load every tier of ``spec`` beside the serving set, smoke-test, switch in one step.

        ``sources`` gives each model's installed file and smoke test; a model the
        serving set already runs, or another slot of ``spec`` names, is loaded once. A tier that fails is skipped (event
        ``tier_skipped``) while another tier of its slot loads; a slot with no loadable
        tier refuses the whole deployment (DeploymentError; the serving set is
        untouched). ``watch`` keeps the replaced set as standby for the watch window.
        Returns the ``swap_ok`` event.
        """
        with self._activate_lock:
            with self._lock:
                if self._closed:
                    raise SlimfleetError("the model server is closed")
                before = self._active
                reuse = before.models() if before else {}
            started = time.perf_counter()
            came_from = before.loaded() if before else None
            self._emit(EVENT_SWAP_STARTED, deployment=tiers(spec), **{"from": came_from})
            timings: dict[str, float] = {"load_ms": 0.0, "smoke_ms": 0.0}
            slots = {}
            for name in sorted(spec):
                slots[name] = self._load_slot(name, spec, sources, reuse, timings, max_latency_ms)
            new = ServingSet(spec, slots)
            replaced = self._swap_in(new, watch=watch)
            done = time.perf_counter()
            log.info("serving deployment %s", new.loaded())
            return self._emit(
                EVENT_SWAP_OK,
                deployment=new.loaded(),
                load_ms=round(timings["load_ms"], 3),
                smoke_ms=round(timings["smoke_ms"], 3),
                total_ms=round((done - started) * 1000, 3),
                **{"from": replaced},
            )

    def _load_slot(
        self,
        name: str,
        spec: Deployment,
        sources: Mapping[ModelRef, ModelSource],
        reuse: dict[ModelRef, LoadedModel],
        timings: dict[str, float],
        max_latency_ms: float | None,
    ) -> Slot:
        loaded, failures = {}, []
        for ref in spec[name].models:
            if ref in reuse:
                loaded[ref] = reuse[ref]
                continue
            source = sources.get(ref)
            try:
                if source is None:
                    raise ActivationError(ref, "load", "the model is not installed")
                model, took = load_model(
                    ref,
                    source.path,
                    threads=self.threads,
                    smoke=source.smoke,
                    max_latency_ms=max_latency_ms,
                )
            except ActivationError as exc:
                failures.append(exc)
                continue
            timings["load_ms"] += took["load_ms"]
            timings["smoke_ms"] += took["smoke_ms"] or 0.0
            loaded[ref] = reuse[ref] = model  # another slot naming it shares it
        try:
            if not loaded:
                raise failures[0]
            slot = build_slot(
                name, spec[name], loaded, self.telemetry, self._emit, self.confidence_functions
            )
        except (ActivationError, InputError) as exc:  # InputError: a gate that does not import
            ref = getattr(exc, "ref", spec[name].primary)
            stage, reason = getattr(exc, "stage", "load"), getattr(exc, "reason", str(exc))
            self._emit(
                EVENT_SWAP_FAILED,
                slot=name,
                model=ref.to_dict(),
                deployment=tiers(spec),
                stage=stage,
                reason=reason,
            )
            raise DeploymentError(name, ref, stage, reason) from None
        for exc in failures:
            log.warning("slot %s: skipping tier %s: %s", name, exc.ref, exc)
            self._emit(
                EVENT_TIER_SKIPPED,
                slot=name,
                model=exc.ref.to_dict(),
                stage=exc.stage,
                reason=exc.reason,
            )
        return slot

    def _swap_in(self, new: ServingSet, *, watch: bool) -> Loaded | None:
        """Make ``new`` current; keep the replaced set as standby when watching."""
        policy = self.watch_policy
        retire = []
        with self._lock:
            old, self._active = self._active, new
            if self._standby is not None:
                retire.append(self._standby)
            self._standby, self._watch = None, None
            if old is not None:
                if watch and policy.window_s > 0:
                    samples = old.samples()
                    bases = {s: baseline(policy, samples[s]) for s in new.slots if s in samples}
                    self._standby = old
                    self._watch = _Watch(new, old, time.monotonic(), bases)
                else:
                    retire.append(old)
            self.telemetry.set_deployment(_primaries(new))
        self._wake.set()
        self._retire(retire)
        return old.loaded() if old else None

    def close(self) -> None:
        """Stop serving; later requests raise NoModelError. Waits for the drains."""
        with self._activate_lock:
            with self._lock:
                self._closed = True
                retire = [s for s in (self._active, self._standby) if s is not None]
                self._active = self._standby = self._watch = None
                self.telemetry.set_deployment({})
            self._wake.set()
            self._retire(retire)
        self.drained()
        self._watcher.join(timeout=5)

    def __enter__(self) -> DeploymentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one release path -----------------------------------------------------------

    def _retire(self, sets: list[ServingSet]) -> None:
        """Drain and drop ``sets`` on a background thread (never on the caller's path)."""
        if not sets:
            return
        thread = threading.Thread(target=self._drain, args=(sets,), name="release", daemon=True)
        with self._lock:
            self._releasers = [t for t in self._releasers if t.is_alive()] + [thread]
        thread.start()

    def _drain(self, sets: list[ServingSet]) -> None:
        with self._lock:
            for done in sets:
                done.retired = True
                if not self._drained.wait_for(lambda s=done: not s.inflight, DRAIN_TIMEOUT_S):
                    log.warning(
                        "%d requests still running on %s after %.0f s; releasing anyway "
                        "(they keep their sessions alive until they finish)",
                        done.inflight,
                        done.loaded(),
                        DRAIN_TIMEOUT_S,
                    )
        sets.clear()  # the last references: sessions not shared with a live set are freed
        return_freed_memory()

    def drained(self, timeout: float | None = None) -> bool:
        """Wait until every replaced set has been released; False on timeout."""
        with self._lock:
            pending = list(self._releasers)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in pending:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in pending)

    # -- watch window -------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while True:
            with self._lock:
                closed, watch = self._closed, self._watch
            if closed:
                return
            if watch is None:
                self._wake.wait()
            else:
                try:
                    self._check(watch)
                except Exception:  # a bug here must not stop future watches
                    log.exception("watch window check failed")
                self._wake.wait(WATCH_TICK_S)
            self._wake.clear()

    def _check(self, watch: _Watch) -> None:
        elapsed = time.monotonic() - watch.started
        verdict = judge(self.watch_policy, elapsed, watch.new.samples(), watch.bases)
        if verdict.rollback is None and not verdict.settled:
            return
        with self._lock:
            if self._watch is not watch:
                return  # superseded by another swap or close
            self._watch, self._standby = None, None
            if verdict.rollback is not None:
                self._active = watch.old
                self.telemetry.set_deployment(_primaries(watch.old))
        if verdict.rollback is None:
            self._retire([watch.old])
            log.info("deployment %s passed its watch window", watch.new.loaded())
            _call(self._on_settled, watch.new.spec)
            return
        old = watch.old
        self._retire([watch.new])
        log.warning("fell back to %s: %s", old.loaded(), verdict.rollback)
        self._emit(
            EVENT_FALLBACK,
            deployment=watch.new.loaded(),
            to=old.loaded(),
            stage="watch",
            reason=verdict.rollback,
        )
        _call(self._on_fallback, watch.new.spec, old.spec, verdict.rollback)

    # -- events -----------------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "ts": time.time(), "slot": None, "model": None, **fields}
        self.telemetry.count_event(event)
        _call(self._on_event, event)
        return event


def _primaries(serving: ServingSet) -> dict[str, ModelRef]:
    return {name: slot.primary.ref for name, slot in serving.slots.items()}


def _call(callback: Callable[..., None] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("callback %r failed", callback)
