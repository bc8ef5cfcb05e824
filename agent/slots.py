"""What a request runs on: a serving set (one deployment's loaded slots) and its slots.

:meth:`Pinned.predict` is the one path of every request; it calls :meth:`Slot.answer`,
the one function that runs a slot. A slot answers with its first loaded tier; a tier
that failed to load was left out when the slot was built. Each tier run is timed into
the telemetry (``tiers`` of the slot).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimfleet.agent.inference import Answer, FeedError, InferenceError, ModelIO, UnknownSlotError
from slimfleet.agent.sessions import LoadedModel, first_line
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.watch import FAILED
from slimfleet.agent.wire import Deployment, ModelRef, SlotSpec

RECENT_SAMPLES = 2048  # per slot of a serving set, for the watch window

Loaded = dict[str, list[dict[str, Any]]]  # {slot: [ref dicts of the loaded tiers]}


@dataclass(frozen=True)
class TimedTier:
    """A loaded model as a tier of one slot: ``run`` is timed into the slot's telemetry."""

    model: LoadedModel
    slot: str
    telemetry: Telemetry

    @property
    def label(self) -> str:
        return self.model.label

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        try:
            return self.model.run(feeds)
        finally:
            self.telemetry.tier_run(self.slot, self.label, time.perf_counter() - started)


@dataclass(frozen=True)
class Slot:
    """A slot's spec and its loaded tiers (at least one), first to last."""

    name: str
    spec: SlotSpec
    tiers: tuple[LoadedModel, ...]
    timed: tuple[TimedTier, ...]

    @property
    def primary(self) -> LoadedModel:
        """The first loaded tier: its inputs are the slot's inputs."""
        return self.tiers[0]

    @property
    def io(self) -> ModelIO:
        return self.primary.io

    def answer(self, feeds: dict[str, np.ndarray]) -> Answer:
        """Run the slot on checked feeds; InferenceError when the model fails."""
        tier = self.timed[0]
        try:
            outputs = tier.run(feeds)
        except Exception as exc:  # onnxruntime raises plain Exception subclasses
            raise InferenceError(f"{tier.label}: inference failed: {first_line(exc)}") from None
        return Answer(tier.model.ref, tier.label, outputs)


def build_slot(name: str, spec: SlotSpec, tiers: list[LoadedModel], telemetry: Telemetry) -> Slot:
    """The slot ``name`` serving ``tiers`` (the loadable ones of ``spec``, in order)."""
    if not tiers:
        raise ValueError(f"slot {name}: no loaded tier")
    timed = tuple(TimedTier(model, name, telemetry) for model in tiers)
    return Slot(name, spec, tuple(tiers), timed)


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


@dataclass(frozen=True)
class Pinned:
    """One serving set held by :meth:`DeploymentServer.pinned`; every request of every
    slot goes through :meth:`predict`."""

    serving: ServingSet
    telemetry: Telemetry

    def predict(self, slot: str, feeds: Mapping[str, Any], *, cast: bool = False) -> Answer:
        target = self.serving.slots.get(slot)
        if target is None:
            self.telemetry.client_error(None)
            raise UnknownSlotError(f"no slot {slot!r} in the deployment serving now")
        started = time.perf_counter()
        try:
            ready = target.primary.check_feeds(feeds, cast)
        except FeedError:
            self.telemetry.client_error(slot)
            raise
        try:
            answer = target.answer(ready)
        except InferenceError:
            self.serving.recent[slot].append(FAILED)
            self.telemetry.record_error(slot)
            raise
        latency = time.perf_counter() - started
        self.serving.recent[slot].append(latency)
        self.telemetry.record(slot, latency, answer.escalations)
        return answer
