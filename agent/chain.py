"""The per-request fallback chain of one slot: local tiers first to last, then a remote.

A request goes to the first loaded tier. It moves on ("escalates") to the next tier when

- the tier is not loaded (``None`` in ``tiers``: it failed to load, the slot serves
  without it),
- the tier fails (any error but a :class:`FeedError`) or times out, or
- the gate says the answer is not good enough: ``confidence(outputs) < threshold``; a NaN
  confidence, or a confidence function that raises, counts as not good enough.

The last tier that answers is returned even when it is unconfident: the last local tier
when there is no remote, else the remote; and when the tiers after an unconfident answer
all fail, that unconfident answer (the latest one) is returned rather than an error.
Only when no tier produced an answer does :meth:`Chain.run` raise: an
:class:`InferenceError` naming every tier's failure, or a :class:`NoModelError` when no
tier is loaded at all (nothing ran, so no model is at fault). A :class:`FeedError` (the request
does not fit the model: the client's fault) is raised at once, never escalated.

Without a gate the chain falls back on failure only. A :class:`Chain` is immutable after
construction and keeps no per-request state: it takes no lock, and is safe to call from
any number of threads as long as its tiers are (onnxruntime sessions are; the remote
tier guards its circuit breaker itself).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from slimfleet.agent.confidence import Confidence, resolve_confidence
from slimfleet.agent.deployment import Gate, SlotSpec
from slimfleet.agent.inference import FeedError, InferenceError, NoModelError
from slimfleet.agent.wire import ModelRef

Outputs = dict[str, np.ndarray]
REMOTE_LABEL = "remote"
KERNEL_FAILURE = "Non-zero status code returned while running"
"""How onnxruntime's message starts when a node failed at run time (not the feeds)."""


class Tier(Protocol):
    """One way to answer a request: a loaded local model or the remote server."""

    label: str  # "name@version" for a local model, "remote" for the user's server

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs by name; raises InferenceError (or TierTimeout) or FeedError."""
        ...


class TierTimeout(InferenceError):
    """A tier did not answer in its time (the remote tier's ``timeout_s``)."""


def first_line(exc: BaseException) -> str:
    """An error's message as one line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TierTimeout) else f"failed: {first_line(exc)}"


class SessionTier:
    """A local tier on an onnxruntime session (``slimfleet chain calibrate`` and the bench
    run tiers this way; the agent's serving wraps its loaded models itself). Feeds that
    onnxruntime rejects before running (name, type, shape) are a FeedError; a failure
    while running, even one onnxruntime calls an invalid argument (an index out of a
    table), is an InferenceError."""

    def __init__(self, label: str, session: ort.InferenceSession) -> None:
        self.label = label
        self.session = session
        self.input_names = {i.name for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(feeds) != self.input_names:
            raise FeedError(
                f"{self.label} expects inputs {sorted(self.input_names)}; got {sorted(feeds)}"
            )
        try:
            values = self.session.run(self.output_names, feeds)
        except InvalidArgument as exc:
            if KERNEL_FAILURE not in str(exc):  # rejected before running: the feeds
                raise FeedError(f"{self.label}: {first_line(exc)}") from None
            raise InferenceError(f"{self.label}: {first_line(exc)}") from None
        except Exception as exc:  # onnxruntime's failures have no common base
            raise InferenceError(f"{self.label}: {first_line(exc)}") from None
        return dict(zip(self.output_names, values, strict=True))


@dataclass
class ChainAnswer:
    """Which tier answered (its index in the chain, the remote being last), its outputs,
    and every tier passed over on the way as ``(label, reason)``."""

    tier_index: int
    label: str
    outputs: dict[str, np.ndarray]
    escalations: list[tuple[str, str]]
    tier_seconds: list[tuple[str, float]] = field(default_factory=list)
    """Wall time of each tier that ran for this request, in order (for telemetry)."""


class Chain:
    """The fallback chain of one slot (see the module docstring for the rules)."""

    def __init__(
        self,
        tiers: Sequence[Tier | None],
        gate: Gate | None,
        confidence: Callable[[dict[str, np.ndarray]], float] | None,
        remote: Tier | None = None,
        *,
        labels: Sequence[str] | None = None,
    ) -> None:
        """``tiers`` first to last, ``None`` for a tier that is not loaded; ``labels``
        names every tier (so a missing one can be named in escalations; by default a
        loaded tier's own label, ``tier N`` for a missing one). With a ``gate`` and no
        ``confidence``, the gate's function is resolved as a built-in or ``module:attr``
        (a ConfigError when it does not import)."""
        if not tiers and remote is None:
            raise ValueError("a chain needs at least one tier")
        if labels is not None and len(labels) != len(tiers):
            raise ValueError(f"{len(labels)} labels for {len(tiers)} tiers")
        self.tiers: tuple[Tier | None, ...] = tuple(tiers)
        self.remote = remote
        self.labels: tuple[str, ...] = tuple(
            labels[i] if labels is not None else (t.label if t is not None else f"tier {i + 1}")
            for i, t in enumerate(self.tiers)
        )
        self.gate = gate
        self.confidence: Confidence | None = None
        if gate is not None:
            self.confidence = confidence or resolve_confidence(gate.function)
        self._order: tuple[tuple[str, Tier | None], ...] = tuple(
            zip(self.labels, self.tiers, strict=True)
        ) + (((REMOTE_LABEL, remote),) if remote is not None else ())

    def _judged(self, outputs: Outputs) -> str | None:
        """Why ``outputs`` are not good enough, or None when they pass the gate."""
        if self.gate is None or self.confidence is None:
            return None
        try:
            value = float(self.confidence(outputs))
        except (Exception, SystemExit) as exc:  # a user function can raise (or exit): escalate
            return f"failed: confidence {self.gate.function}: {type(exc).__name__}: {exc}"
        if math.isnan(value):
            return "confidence is NaN"
        if value < self.gate.threshold:
            return f"low confidence {value:.4g} < {self.gate.threshold:.4g}"
        return None

    def run(self, feeds: dict[str, np.ndarray]) -> ChainAnswer:
        """Answer ``feeds`` with the first good-enough tier (see the module docstring)."""
        escalations: list[tuple[str, str]] = []
        timings: list[tuple[str, float]] = []
        fallback: ChainAnswer | None = None  # the latest unconfident answer
        last = len(self._order) - 1
        for index, (label, tier) in enumerate(self._order):
            if tier is None:
                escalations.append((label, "not loaded"))
                continue
            started = time.perf_counter()
            try:
                outputs = tier.run(feeds)
            except FeedError:
                raise
            except Exception as exc:  # a tier's failure is the next tier's turn
                timings.append((label, time.perf_counter() - started))
                escalations.append((label, _reason(exc)))
                continue
            timings.append((label, time.perf_counter() - started))
            answer = ChainAnswer(index, label, outputs, list(escalations), timings)
            problem = None if index == last else self._judged(outputs)
            if problem is None:
                return answer
            escalations.append((label, problem))
            fallback = answer
        if fallback is not None:
            own = len(fallback.escalations)  # its own "low confidence" entry is next
            fallback.escalations = escalations[:own] + escalations[own + 1 :]
            return fallback
        reasons = "; ".join(f"{label}: {why}" for label, why in escalations)
        if not timings:  # nothing ran: not a model's failure
            raise NoModelError(f"no tier of the chain is loaded ({reasons})")
        raise InferenceError(f"every tier failed: {reasons}")


def chain_for_slot(
    spec: SlotSpec,
    loaded: Mapping[ModelRef, Tier],
    remote: Tier | None = None,
    user_functions: Mapping[str, str] | None = None,
) -> Chain:
    """The chain a slot's spec describes: its models in order, each the loaded tier or
    ``None`` when it is not in ``loaded`` (labelled ``name@version`` either way), its gate
    with the function resolved (``user_functions``: agent.yaml ``confidence_functions:``;
    a ConfigError when it does not import), and ``remote`` (a
    :class:`slimfleet.agent.remote.RemoteClient` for ``spec.remote``) last."""
    confidence = (
        resolve_confidence(spec.gate.function, user_functions) if spec.gate is not None else None
    )
    return Chain(
        [loaded.get(ref) for ref in spec.models],
        spec.gate,
        confidence,
        remote,
        labels=[str(ref) for ref in spec.models],
    )
