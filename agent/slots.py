"""What a request runs on: a serving set (one deployment's loaded slots) and its slots.

:meth:`Pinned.predict` is the one path of every request; it calls :meth:`Slot.answer`,
the one function that runs a slot: with its first loaded tier, or through the fallback
chain (:mod:`slimfleet.agent.chain`) when the slot names several tiers, a gate or a
remote; a tier that failed to load is passed over. Each tier run is timed into the
telemetry (``tiers`` of the slot), and an answer says which tier produced it and how
many were passed over (``escalations``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from slimfleet.agent.chain import REMOTE_LABEL, Chain, chain_for_slot
from slimfleet.agent.deployment import Deployment, SlotSpec
from slimfleet.agent.inference import Answer, FeedError, InferenceError, ModelIO, UnknownSlotError
from slimfleet.agent.remote import RemoteClient
from slimfleet.agent.sessions import LoadedModel, first_line
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.watch import FAILED
from slimfleet.agent.wire import ModelRef

RECENT_SAMPLES = 2048  # per slot of a serving set, for the watch window

Loaded = dict[str, list[dict[str, Any]]]  # {slot: [ref dicts of the loaded tiers]}


def describe_loaded(loaded: Loaded) -> str:
    """``det: det@3; rec: rec@5 > rec@4`` (each slot's loaded tiers, first to last)."""
    return "; ".join(
        f"{slot}: " + " > ".join(f"{r['name']}@{r['version']}" for r in refs)
        for slot, refs in sorted(loaded.items())
    )


class _Runs(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TimedTier:
    """A tier of one slot (a loaded model, or the remote server when ``ref`` is None):
    :meth:`run` is timed into the slot's telemetry, and a failure is an InferenceError
    naming the tier. It is the :class:`slimfleet.agent.chain.Tier` the chain runs."""

    label: str
    ref: ModelRef | None
    inner: _Runs
    slot: str
    telemetry: Telemetry

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        try:
            return self.inner.run(feeds)
        except (FeedError, InferenceError):
            raise
        except Exception as exc:  # onnxruntime raises plain Exception subclasses
            raise InferenceError(f"{self.label}: inference failed: {first_line(exc)}") from None
        finally:
            self.telemetry.tier_run(self.slot, self.label, time.perf_counter() - started)


@dataclass(frozen=True)
class Slot:
    """A slot's spec, its loaded tiers (at least one) first to last, and how it answers:
    its first loaded tier alone, or the fallback chain when the spec names several
    tiers, a gate or a remote."""

    name: str
    spec: SlotSpec
    tiers: tuple[LoadedModel, ...]
    first: TimedTier
    chain: Chain | None = None

    @property
    def primary(self) -> LoadedModel:
        """The first loaded tier: its inputs are the slot's inputs."""
        return self.tiers[0]

    @property
    def io(self) -> ModelIO:
        return self.primary.io

    def answer(self, feeds: dict[str, np.ndarray]) -> Answer:
        """Run the slot on checked feeds; InferenceError when no tier could answer."""
        if self.chain is None:
            return Answer(self.first.ref, self.first.label, self.first.run(feeds))
        answer = self.chain.run(feeds)
        ref = next((t.ref for t in self.tiers if t.label == answer.label), None)
        return Answer(ref, answer.label, answer.outputs, len(answer.escalations))


def build_slot(
    name: str,
    spec: SlotSpec,
    loaded: Mapping[ModelRef, LoadedModel],
    telemetry: Telemetry,
    on_event: Callable[..., object],
    user_functions: Mapping[str, str] | None = None,
) -> Slot:
    """The slot ``name`` of ``spec`` over the ``loaded`` models (a tier missing there
    failed to load and is passed over). ``on_event(kind, slot=, reason=)`` receives the
    remote tier's events; ``user_functions`` are agent.yaml's ``confidence_functions``.
    Raises ValueError when no tier is loaded and ConfigError when the gate's confidence
    function does not import."""
    present = tuple(loaded[ref] for ref in spec.models if ref in loaded)
    if not present:
        raise ValueError(f"slot {name}: no loaded tier")
    timed = {t.ref: TimedTier(t.label, t.ref, t, name, telemetry) for t in present}
    first = timed[present[0].ref]
    if len(spec.models) == 1 and spec.gate is None and spec.remote is None:
        return Slot(name, spec, present, first)
    remote = None
    if spec.remote is not None:
        client = RemoteClient(
            spec.remote, lambda kind, reason: on_event(kind, slot=name, reason=reason)
        )
        remote = TimedTier(REMOTE_LABEL, None, client, name, telemetry)
    chain = chain_for_slot(spec, timed, remote, user_functions)
    return Slot(name, spec, present, first, chain)


@dataclass(eq=False)
class ServingSet:
    """One deployment's loaded slots. Immutable after construction except ``inflight``
    and ``retired`` (guarded by the server's ``_lock``) and ``recent`` (thread-safe
    deques, appended by requests without a lock, copied by the watch thread)."""

    spec: Deployment
    slots: dict[str, Slot]
    inflight: int = 0
    retired: bool = False
    recent: dict[str, deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.recent = {name: deque(maxlen=RECENT_SAMPLES) for name in self.slots}

    def loaded(self) -> Loaded:
        return {name: [t.ref.to_dict() for t in slot.tiers] for name, slot in self.slots.items()}

    def models(self) -> dict[ModelRef, LoadedModel]:
        return {t.ref: t for slot in self.slots.values() for t in slot.tiers}

    def samples(self) -> dict[str, np.ndarray]:
        return {name: np.array(d.copy(), dtype=np.float64) for name, d in self.recent.items()}


ANSWERED_SHAPES = 1024
"""Input shapes remembered per slot (see :class:`AnsweredShapes`); past it, a failure on
a new shape is the request's."""


class AnsweredShapes:
    """The input shapes each slot has answered, across deployments: a model that fails
    on a shape its slot answered before is at fault (the watch counts it); one that fails
    on a shape no version of the slot ever answered (two inputs whose shared dimension
    disagrees, an image size a stride cannot divide) was sent a request it cannot run,
    which any client can send: counting those let a stranger roll a device back. At
    most :data:`ANSWERED_SHAPES` per slot. The lock guards ``_shapes``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shapes: dict[str, set[tuple[tuple[int, ...], ...]]] = {}

    @staticmethod
    def _key(feeds: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(feeds[name].shape) for name in sorted(feeds))

    def add(self, slot: str, feeds: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            known = self._shapes.setdefault(slot, set())
            if len(known) < ANSWERED_SHAPES:
                known.add(self._key(feeds))

    def answered(self, slot: str, feeds: Mapping[str, np.ndarray]) -> bool:
        with self._lock:
            return self._key(feeds) in self._shapes.get(slot, ())


@dataclass(frozen=True)
class Pinned:
    """One serving set held by :meth:`DeploymentServer.pinned`; every request of every
    slot goes through :meth:`predict`."""

    serving: ServingSet
    telemetry: Telemetry
    shapes: AnsweredShapes

    def predict(self, slot: str, feeds: Mapping[str, Any], *, cast: bool = False) -> Answer:
        target = self.serving.slots.get(slot)
        if target is None:
            raise UnknownSlotError(f"no slot {slot!r} in the deployment serving now")
        started = time.perf_counter()
        ready = target.primary.check_feeds(feeds, cast)  # FeedError: the client's fault
        try:
            answer = target.answer(ready)
        except InferenceError as exc:
            if not self.shapes.answered(slot, ready):
                shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(ready.items()))
                raise FeedError(
                    f"slot {slot!r} has never answered inputs shaped {shapes}, and cannot: {exc}"
                ) from None
            self.serving.recent[slot].append(FAILED)
            self.telemetry.record_error(slot)
            raise
        self.shapes.add(slot, ready)
        latency = time.perf_counter() - started
        self.serving.recent[slot].append(latency)
        self.telemetry.record(slot, latency, answer.escalations)
        return answer
