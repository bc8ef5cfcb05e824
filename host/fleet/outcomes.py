"""Waiting for what devices made of a desired state: serving it, refused (why), or silence.

Every agent publishes its state retained on ``devices/<id>/state`` (schema in
:mod:`slimfleet.agent.wire`); its ``desired`` part names the seq of the last desired
state the device saw and the ``outcome``. The host polls those retained documents until
each targeted device reports the seq it was sent with a final outcome, or the timeout
passes. Documents are read by :mod:`slimfleet.host.fleet.reports` (bodies over its
MAX_REPORT_BYTES are refused unread). Bounds: one retained read per ``poll_s`` (0.25 s),
at most ``timeout`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from slimfleet.agent.deployment import DesiredState
from slimfleet.agent.wire import Topics
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.reports import (
    OUTCOME_PENDING,
    OUTCOME_REFUSED,
    OUTCOME_SERVING,
    OUTCOME_STALE,
    DeviceState,
    ReportError,
    decode,
    parse_state,
)

log = logging.getLogger(__name__)

SERVING, REFUSED, STALE, PENDING = OUTCOME_SERVING, OUTCOME_REFUSED, OUTCOME_STALE, OUTCOME_PENDING
NO_ANSWER = "no answer"
SUPERSEDED = "superseded"  # the device reports a newer seq than the one waited for
FINAL = (SERVING, REFUSED, STALE)
SETTLED = (*FINAL, SUPERSEDED)  # nothing more will come for the seq waited for
DEFAULT_WAIT_S = 60.0
POLL_S = 0.25


def read_states(link: BrokerLink, topics: Topics, devices: list[str]) -> dict[str, DeviceState]:
    """The retained state of each device that has a readable one (others: debug log)."""
    wanted = {topics.device(d, "state"): d for d in devices}
    got = link.read_retained(list(wanted)) if wanted else {}
    states = {}
    for topic, payload in got.items():
        try:
            state = parse_state(decode(payload, topic), topic)
        except ReportError as exc:
            log.debug("unreadable state document: %s", exc)
            continue
        if state.device == wanted[topic]:
            states[state.device] = state
    return states


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
        if self.outcome == PENDING and self.stage:  # a transient failure, retried
            why = f"{self.stage}: {self.reason}" if self.reason else self.stage
            return f"{self.device}: pending at {why} (retrying seq {self.seq})"
        if self.outcome == PENDING:
            return f"{self.device}: no answer (still working on seq {self.seq})"
        if self.outcome == SUPERSEDED:
            return (
                f"{self.device}: superseded (it reports another desired state than seq {self.seq})"
            )
        return f"{self.device}: {self.outcome}" + (f" ({self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome_of(
    device: str, seq: int, state: DeviceState | None, issued: float | None = None
) -> Outcome:
    """The outcome ``state`` reports for ``seq`` (pure): final, pending or no answer.

    With ``issued`` (when the desired state sent was signed), a report on the same seq
    issued at another time is another host's desired state: superseded."""
    desired = state.desired if state is not None else None
    if desired is None or desired.seq < seq:
        return Outcome(device, seq, NO_ANSWER)
    if desired.seq > seq or (issued is not None and desired.issued != issued):
        return Outcome(device, seq, SUPERSEDED)
    outcome = desired.outcome if desired.outcome in FINAL else PENDING
    return Outcome(device, seq, outcome, desired.stage, desired.reason)


def sent(issued: Iterable[DesiredState]) -> tuple[dict[str, int], dict[str, float]]:
    """``(device -> seq, device -> issued)`` of desired states just sent, for waiting."""
    issued = list(issued)
    return {d.device: d.seq for d in issued}, {d.device: d.issued for d in issued}


def wait_for_outcomes(
    link: BrokerLink,
    topics: Topics,
    expected: Mapping[str, int],
    timeout: float = DEFAULT_WAIT_S,
    *,
    issued: Mapping[str, float] | None = None,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
) -> list[Outcome]:
    """Poll retained states until each device in ``expected`` (device -> seq sent) has a
    final outcome for its seq, or ``timeout`` passes; return one Outcome per device, in
    the order of ``expected``. ``issued`` (device -> issued time sent), when given, tells
    a concurrent host's desired state with the same seq from ours."""
    deadline = clock() + timeout
    results: dict[str, Outcome] = {}
    issued = issued or {}
    while True:
        waiting = [d for d in expected if d not in results or results[d].outcome not in SETTLED]
        states = read_states(link, topics, waiting)
        for device in waiting:
            results[device] = outcome_of(
                device, expected[device], states.get(device), issued.get(device)
            )
        if all(r.outcome in SETTLED for r in results.values()) or clock() >= deadline:
            return [results[d] for d in expected]
        time.sleep(poll_s)
