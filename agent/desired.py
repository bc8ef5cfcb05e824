"""The desired state on the device: admission (replay, skew, enrolment, expiry) and desired.json.

:func:`admit` is the freshness policy, a pure function: a desired state is applied
only if it is for this device, its ``seq`` is above the replay floor (the highest seq
accepted), it was issued at or after this store's enrolment, not more than
``max_clock_skew_s`` in the device's future, and has not expired. Its verdict names
the stage reported to the host (``verify``, ``replay``, ``skew``, ``expired``).

:class:`Record` is the last desired state the device took notice of and what became of
it (``outcome`` pending / serving / refused / stale, with ``stage`` and ``reason``). It
is persisted in ``desired.json`` with the floor and the enrolment time, which are kept
in state.json too: a corrupt or missing copy never lowers the floor
(:func:`merge_freshness` takes the highest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slimfleet.agent.deployment import DesiredState
from slimfleet.agent.errors import VerifyError
from slimfleet.agent.signing import Verifier
from slimfleet.agent.store import AgentState, ModelStore, atomic_write_bytes, read_bounded
from slimfleet.agent.wire import loads_json

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.json"
MAX_DESIRED_FILE_BYTES = 256 * 1024  # a desired state is a few KiB; refuse to read more

OUTCOME_PENDING = "pending"
OUTCOME_SERVING = "serving"
OUTCOME_REFUSED = "refused"
OUTCOME_STALE = "stale"

STAGE_VERIFY = "verify"
STAGE_REPLAY = "replay"
STAGE_SKEW = "skew"
STAGE_EXPIRED = "expired"


@dataclass(frozen=True)
class Refusal:
    """Why a desired state is not applied: the stage reported and one line."""

    stage: str
    reason: str


def admit(
    desired: DesiredState,
    *,
    device: str,
    floor: int,
    enrolled: float,
    now: float,
    max_skew_s: float,
) -> Refusal | None:
    """The freshness policy (see the module docstring); None admits ``desired``."""
    if desired.device != device:
        return Refusal(STAGE_VERIFY, f"the desired state is for device {desired.device!r}")
    if desired.seq <= floor:
        return Refusal(
            STAGE_REPLAY, f"seq {desired.seq} is not above the {floor} already accepted (a replay?)"
        )
    if desired.issued > now + max_skew_s:
        return Refusal(
            STAGE_SKEW,
            f"issued {desired.issued - now:.0f} s in this device's future "
            f"(more than the {max_skew_s:g} s allowed clock skew)",
        )
    # The same clock allowance on the past side: an assign sent while the device boots
    # must not read as a replay onto a wiped store (the host's clock may lead ours).
    if desired.issued < enrolled - max_skew_s:
        return Refusal(
            STAGE_REPLAY,
            f"issued {enrolled - desired.issued:.0f} s before this device's store was "
            "created (a replay onto a wiped device?)",
        )
    if desired.expired(now):
        return Refusal(STAGE_EXPIRED, f"expired {now - desired.expires:.0f} s ago")
    return None


@dataclass(frozen=True)
class Record:
    """The last desired state taken notice of, its signed bytes and its outcome."""

    desired: DesiredState
    envelope: bytes
    outcome: str = OUTCOME_PENDING
    stage: str | None = None
    reason: str | None = None

    def with_outcome(
        self, outcome: str, stage: str | None = None, reason: str | None = None
    ) -> Record:
        return replace(self, outcome=outcome, stage=stage, reason=reason)


def notice(
    desired: DesiredState,
    envelope: bytes,
    *,
    device: str,
    floor: int,
    enrolled: float,
    now: float,
    max_skew_s: float,
) -> tuple[Refusal | None, Record | None]:
    """Admit ``desired`` (or say why not) and the record the device keeps of it.

    The record is the accepted one (pending), a newer one that cannot be applied
    (stale, or refused for skew or enrolment: the host must see why), or None for a
    replay or another device's desired state (an event only, the record is unchanged).
    """
    refusal = admit(
        desired, device=device, floor=floor, enrolled=enrolled, now=now, max_skew_s=max_skew_s
    )
    record = Record(desired, envelope)
    if refusal is None:
        return None, record
    if desired.seq <= floor or desired.device != device:
        return refusal, None
    outcome = OUTCOME_STALE if refusal.stage == STAGE_EXPIRED else OUTCOME_REFUSED
    return refusal, record.with_outcome(outcome, refusal.stage, refusal.reason)


def expiry_deadline(record: Record | None) -> float | None:
    """The monotonic time the followed ``record`` expires (to mark it stale), else None."""
    if record is None or record.outcome not in (OUTCOME_PENDING, OUTCOME_SERVING):
        return None
    return time.monotonic() + max(0.0, record.desired.expires - time.time())


LONGEST_WAIT_S = 3600.0
"""The control thread wakes at least this often: a desired state expiring centuries
from now (signed, so allowed) is waited for in steps, where one wait would overflow."""


def wait_until(*deadlines: float | None) -> float | None:
    """Seconds to wait for the first of the monotonic ``deadlines`` (None: no deadline),
    at most :data:`LONGEST_WAIT_S`; None when there is none to wait for."""
    due = [d for d in deadlines if d is not None]
    return min(max(0.0, min(due) - time.monotonic()), LONGEST_WAIT_S) if due else None


@dataclass(frozen=True)
class Freshness:
    """The replay floor and the enrolment time, as read from one file."""

    floor: int = 0
    enrolled: float | None = None


def merge_freshness(*copies: Freshness | None, now: float) -> Freshness:
    """The highest floor of every readable copy; the enrolment they recorded, else ``now``.

    With no copy at all (a wiped store) the store enrols now.
    """
    found = [c for c in copies if c is not None]
    floor = max((c.floor for c in found), default=0)
    times = [c.enrolled for c in found if c.enrolled is not None]
    return Freshness(floor, max(times) if times else now)


def _set_aside(path: Path, why: Exception) -> tuple[None, None]:
    log.warning("%s is corrupt (%s): ignoring it, kept as %s.corrupt", path, why, path.name)
    with contextlib.suppress(OSError):  # unreadable: the warning is all we can do
        os.replace(path, path.with_name(f"{DESIRED_FILE}.corrupt"))
    return None, None


def load_record(root: Path, verifier: Verifier) -> tuple[Record | None, Freshness | None]:
    """Read ``desired.json``; a missing, corrupt or unverifiable file gives (None, None)
    (a corrupt one is kept as ``desired.json.corrupt``) and is logged, never raised."""
    path = Path(root) / DESIRED_FILE
    try:
        raw = read_bounded(path, MAX_DESIRED_FILE_BYTES)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None, None
    except ValueError as exc:  # too large, or not a regular file
        return _set_aside(path, exc)
    try:
        doc = loads_json(raw)
        envelope = doc["envelope"].encode()
        desired = DesiredState.from_dict(verifier.verify(envelope, str(path)))
        floor, enrolled = doc["floor"], doc["enrolled"]
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError("floor must be an integer >= 0")
        if isinstance(enrolled, bool) or not isinstance(enrolled, (int, float)):
            raise ValueError("enrolled must be a number")
        if not math.isfinite(enrolled):
            raise ValueError("enrolled must be finite")
        outcome = doc.get("outcome", OUTCOME_PENDING)
        if outcome not in (OUTCOME_PENDING, OUTCOME_SERVING, OUTCOME_REFUSED, OUTCOME_STALE):
            raise ValueError(f"unknown outcome {outcome!r}")
        stage, reason = doc.get("stage"), doc.get("reason")
    except (ValueError, KeyError, TypeError, AttributeError, VerifyError) as exc:
        return _set_aside(path, exc)
    record = Record(desired, envelope, outcome, _text(stage), _text(reason))
    return record, Freshness(floor, float(enrolled))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def save_record(root: Path, record: Record, fresh: Freshness) -> None:
    """Persist ``record`` with the floor and enrolment (atomically); a disk error is
    logged, not raised: the agent keeps following it in memory."""
    doc = {
        "envelope": record.envelope.decode(),
        "outcome": record.outcome,
        "stage": record.stage,
        "reason": record.reason,
        "floor": fresh.floor,
        "enrolled": fresh.enrolled,
    }
    try:
        atomic_write_bytes(Path(root) / DESIRED_FILE, json.dumps(doc).encode())
    except OSError as exc:
        log.error("cannot persist the desired state: %s", exc)


def restore(store: ModelStore, verifier: Verifier) -> tuple[AgentState, Record | None]:
    """The saved state and desired record; the floor is the highest either file holds,
    a wiped store (neither file readable) enrols now. Both files are rewritten when
    they disagree, so a corrupt copy is repaired at once."""
    saved = store.load_state()
    record, fresh = load_record(store.root, verifier)
    from_state = Freshness(saved.floor, saved.enrolled) if saved else None
    merged = merge_freshness(from_state, fresh, now=time.time())
    state = replace(saved or AgentState(), floor=merged.floor, enrolled=merged.enrolled)
    if state != saved:
        try:
            store.save_state(state)
        except OSError as exc:  # a full disk: the agent writes it again (StateFile)
            log.error("cannot write the merged state: %s", exc)
    if record is not None and fresh != merged:
        save_record(store.root, record, merged)
    return state, record
