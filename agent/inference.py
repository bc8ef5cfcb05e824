"""The inference contract between the agent's front doors (HTTP, in-process) and serving.

A contract module: it imports only other contracts. :mod:`slimfleet.agent.serve` (Open
Inference Protocol over HTTP) talks to any :class:`InferenceBackend`; the agent's serving
of a deployment implements it. Errors say who is at fault, which decides both the HTTP
status and whether the request counts against the model in the watch window:

==================  ======  =======================================================
error               HTTP    counted against the model
==================  ======  =======================================================
UnknownSlotError    404     no: the client named a slot the deployment does not have
NoModelError        503     no: the slot exists but nothing is loaded in it yet
FeedError           400     no: the request does not fit the model's inputs
InferenceError      500     yes: the model failed on valid feeds
==================  ======  =======================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.wire import ModelRef


class NoModelError(SlimfleetError):
    """A request arrived while no model is loaded (in that slot)."""


class UnknownSlotError(NoModelError):
    """A request named a slot that the current deployment does not have."""


class FeedError(InputError):
    """The feeds do not match the model's inputs (name, dtype or shape)."""


class InferenceError(SlimfleetError):
    """The model failed while running on valid feeds."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; free dimensions are a name (str) or None."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}

    def fixed_shape(self) -> tuple[int, ...] | None:
        """The shape when every dimension is known, else None."""
        if all(isinstance(d, int) for d in self.shape):
            return tuple(self.shape)  # type: ignore[arg-type]
        return None


@dataclass(frozen=True)
class ModelIO:
    """The input and output signature of a loaded model."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }


@dataclass(frozen=True)
class Answer:
    """What served a request: the model, the tier label (``name@version`` or
    ``remote``), how many tiers were tried before it, and the outputs by name."""

    model: ModelRef | None  # None when the remote tier answered
    tier: str
    outputs: dict[str, np.ndarray]
    escalations: int = 0


class InferenceBackend(Protocol):
    """What the HTTP API needs from serving. Every method is thread-safe."""

    def slots(self) -> list[str]:
        """The slot names of the deployment serving now (sorted)."""
        ...

    def slot_io(self, slot: str) -> ModelIO:
        """The signature of the slot's first tier; UnknownSlotError, NoModelError."""
        ...

    def slot_model(self, slot: str) -> ModelRef:
        """The slot's first tier; UnknownSlotError, NoModelError."""
        ...

    def ready(self) -> bool:
        """True when every slot of the deployment has a model loaded."""
        ...

    def predict(self, slot: str, feeds: Mapping[str, Any], *, cast: bool = False) -> Answer:
        """Run the slot on ``feeds``. ``cast=True`` converts each feed (array or nested
        list) to the input's dtype first. Raises the errors in the module docstring."""
        ...

    def client_error(self, slot: str | None) -> None:
        """Count a request the client got wrong (4xx) in telemetry, never against a model."""
        ...

    def metrics_text(self) -> bytes:
        """Prometheus exposition text for /metrics."""
        ...
