"""Waiting for what devices made of a desired state: serving it, refused (why), or silence.

Every agent publishes its state retained on ``devices/<id>/state`` (schema in
:mod:`slimfleet.agent.wire`); its ``desired`` part names the seq of the last desired
state the device saw and the ``outcome``. The host polls those retained documents until
each targeted device reports the seq it was sent with a final outcome, or the timeout
passes. Bounds: one retained read per ``poll_s`` (0.25 s), at most ``timeout`` seconds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from slimfleet.agent.wire import ModelRef, Topics
from slimfleet.host.fleet.mqttio import BrokerLink

log = logging.getLogger(__name__)

SERVING = "serving"
REFUSED = "refused"
STALE = "stale"
PENDING = "pending"
NO_ANSWER = "no answer"
SUPERSEDED = "superseded"  # the device reports a newer seq than the one waited for
FINAL = (SERVING, REFUSED, STALE)
SETTLED = (*FINAL, SUPERSEDED)  # nothing more will come for the seq waited for
DEFAULT_WAIT_S = 60.0
POLL_S = 0.25
MAX_STATE_BYTES = 256 * 1024  # a state document larger than this is not read


@dataclass(frozen=True)
class Reported:
    """The parts of a device's retained state document that deploying needs."""

    device: str
    desired_seq: int | None
    outcome: str | None
    stage: str | None
    reason: str | None
    floor: int | None
    deployment: dict[str, list[ModelRef]]
    previous: dict[str, list[ModelRef]] | None


def parse_state(device: str, payload: bytes) -> Reported | None:
    """Read a device's state document; None (with a debug log) when it is not one."""
    try:
        if len(payload) > MAX_STATE_BYTES:
            raise ValueError(f"{len(payload)} bytes")
        doc = json.loads(payload)
        desired = doc.get("desired") or {}

        def refs(slots: Any) -> dict[str, list[ModelRef]]:
            return {slot: [ModelRef.from_dict(m) for m in tiers] for slot, tiers in slots.items()}

        def integer(value: Any) -> int | None:
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        def text(value: Any) -> str | None:
            return value if isinstance(value, str) else None

        return Reported(
            device=device,
            desired_seq=integer(desired.get("seq")),
            outcome=text(desired.get("outcome")),
            stage=text(desired.get("stage")),
            reason=text(desired.get("reason")),
            floor=integer(doc.get("floor")),
            deployment=refs(doc.get("deployment") or {}),
            previous=refs(doc["previous"]) if doc.get("previous") is not None else None,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        log.debug("%s: unreadable state document (%s)", device, exc)
        return None


def read_states(link: BrokerLink, topics: Topics, devices: list[str]) -> dict[str, Reported]:
    """The retained state of each device that has a readable one."""
    wanted = {topics.device(d, "state"): d for d in devices}
    got = link.read_retained(list(wanted)) if wanted else {}
    states = {wanted[t]: parse_state(wanted[t], p) for t, p in got.items()}
    return {d: s for d, s in states.items() if s is not None}


@dataclass(frozen=True)
class Outcome:
    """What one device made of the desired state with ``seq``."""

    device: str
    seq: int
    outcome: str  # serving, refused, stale, pending, superseded or "no answer"
    stage: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == SERVING

    def line(self) -> str:
        if self.outcome == REFUSED:
            return f"{self.device}: refused at {self.stage or '?'}: {self.reason or 'no reason'}"
        if self.outcome == PENDING:
            return f"{self.device}: no answer (still working on seq {self.seq})"
        if self.outcome == SUPERSEDED:
            return f"{self.device}: superseded (it reports a newer desired state than {self.seq})"
        return f"{self.device}: {self.outcome}" + (f" ({self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome_of(device: str, seq: int, state: Reported | None) -> Outcome:
    """The outcome ``state`` reports for ``seq`` (pure): final, pending or no answer."""
    if state is None or state.desired_seq is None or state.desired_seq < seq:
        return Outcome(device, seq, NO_ANSWER)
    if state.desired_seq > seq:
        return Outcome(device, seq, SUPERSEDED)
    outcome = state.outcome if state.outcome in FINAL else PENDING
    return Outcome(device, seq, outcome, state.stage, state.reason)


def wait_for_outcomes(
    link: BrokerLink,
    topics: Topics,
    expected: Mapping[str, int],
    timeout: float = DEFAULT_WAIT_S,
    *,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
) -> list[Outcome]:
    """Poll retained states until each device in ``expected`` (device -> seq sent) has a
    final outcome for its seq, or ``timeout`` passes; return one Outcome per device, in
    the order of ``expected``."""
    deadline = clock() + timeout
    results: dict[str, Outcome] = {}
    while True:
        waiting = [d for d in expected if d not in results or results[d].outcome not in SETTLED]
        states = read_states(link, topics, waiting)
        for device in waiting:
            results[device] = outcome_of(device, expected[device], states.get(device))
        if all(r.outcome in SETTLED for r in results.values()) or clock() >= deadline:
            return [results[d] for d in expected]
        time.sleep(poll_s)
