"""What the agent reports: the state document and event bodies (schema 2), as pure functions.

The schemas are the contract at the end of :mod:`slimfleet.agent.wire`. ``status``:

``updating``   fetching, installing or loading a desired deployment;
``stale``      the desired state expired: still serving the last deployment;
``serving``    a deployment with at least one slot serves;
``failed``     nothing serves and the last desired state was refused;
``idle``       nothing serves (no deployment yet, or the empty one).

``last_update`` (an addition to the contract) times the last switch: ``{"seq",
"download_s", "install_s", "bytes", "resumed_chunks", "downloaded", "load_s",
"activate_s" (load + smoke tests + switch), "total_s" (desired seen -> serving)}``.
"""

from __future__ import annotations

import time
from typing import Any

from slimfleet.agent.deployment import SCHEMA_VERSION_DESIRED, Deployment
from slimfleet.agent.desired import OUTCOME_REFUSED, OUTCOME_STALE, Record
from slimfleet.agent.store import AgentState
from slimfleet.agent.wire import ModelRef

STATUS_IDLE = "idle"
STATUS_UPDATING = "updating"
STATUS_SERVING = "serving"
STATUS_STALE = "stale"
STATUS_FAILED = "failed"
STATUSES = (STATUS_IDLE, STATUS_UPDATING, STATUS_SERVING, STATUS_STALE, STATUS_FAILED)


def tiers(deployment: Deployment | None) -> dict[str, list[dict[str, Any]]] | None:
    """``{slot: [{"name", "version"}, ...tiers]}`` of a deployment spec."""
    if deployment is None:
        return None
    return {slot: [r.to_dict() for r in spec.models] for slot, spec in sorted(deployment.items())}


def desired_document(record: Record) -> dict[str, Any]:
    """The ``desired`` member of the state document: the desired state and its outcome."""
    d = record.desired
    return {
        "seq": d.seq,
        "issued": d.issued,
        "expires": d.expires,
        "rollback": d.rollback,
        "deployment": tiers(d.deployment),
        "outcome": record.outcome,
        "stage": record.stage,
        "reason": record.reason,
    }


def status(serving: dict[str, Any] | None, records: list[Record | None], *, updating: bool) -> str:
    """The status for the records shown and followed (see the module docstring)."""
    outcomes = {r.outcome for r in records if r is not None}
    if updating:
        return STATUS_UPDATING
    if OUTCOME_STALE in outcomes:
        return STATUS_STALE
    if serving:
        return STATUS_SERVING
    if OUTCOME_REFUSED in outcomes:
        return STATUS_FAILED
    return STATUS_IDLE


def state_document(
    *,
    device: str,
    started: float,
    serving: dict[str, list[dict[str, Any]]] | None,
    state: AgentState,
    record: Record | None,
    followed: Record | None,
    updating: bool,
    last_update: dict[str, Any] | None,
) -> dict[str, Any]:
    """The body published, retained, on ``devices/<id>/state``: ``record`` is the desired
    state shown (the last seen), ``followed`` the one the device applies."""
    return {
        "schema": SCHEMA_VERSION_DESIRED,
        "device": device,
        "ts": time.time(),
        "started": started,
        "status": status(serving, [record, followed], updating=updating),
        "deployment": serving or {},
        "last_good": tiers(state.last_good),
        "previous": tiers(state.previous),
        "desired": desired_document(record) if record is not None else None,
        "floor": state.floor,
        "last_update": last_update,
    }


def event_document(
    kind: str,
    *,
    slot: str | None = None,
    model: ModelRef | None = None,
    seq: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One event body (the daemon adds ``device``)."""
    return {
        "type": kind,
        "ts": time.time(),
        "slot": slot,
        "model": model.to_dict() if model is not None else None,
        "seq": seq,
        **fields,
    }
