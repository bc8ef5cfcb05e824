"""One slot of a deployment: its loaded tiers, first to last, and how a request is answered.

:meth:`Slot.answer` is the one function every request of a slot goes through. A slot
answers with its first loaded tier; a tier that failed to load was left out when the
slot was built. Each tier run is timed into the telemetry (``tiers`` of the slot).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from slimfleet.agent.inference import Answer, InferenceError, ModelIO
from slimfleet.agent.sessions import LoadedModel, first_line
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.wire import SlotSpec


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
