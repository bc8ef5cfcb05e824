"""Serving an earlier deployment: at startup, and when a model's signing key is revoked.

:func:`revoked_models` names the models of a deployment whose stored manifest was signed
by a key the key ring now revokes. :func:`serve_first_usable` activates the first of
some candidate deployments (the last good one, then the previous one) that has no such
model and loads: a deployment with a revoked model is skipped with a ``key_revoked``
event, one that fails to load with a ``fallback`` event. Each candidate's models are
re-verified (:meth:`Updater.installed`: integrity at rest) before activation.
:func:`leave_revoked` is the daemon's reaction to a revocation: it falls back off a
serving deployment with a revoked model, or says it keeps serving it for want of another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from slimfleet.agent.deployment import Deployment
from slimfleet.agent.errors import VerifyError
from slimfleet.agent.inbox import Message
from slimfleet.agent.keyring import KeyRing
from slimfleet.agent.report import tiers
from slimfleet.agent.serving import DeploymentError, DeploymentServer
from slimfleet.agent.update import Emit, Updater
from slimfleet.agent.wire import EVENT_DESIRED_REFUSED, EVENT_FALLBACK, EVENT_KEY_REVOKED, ModelRef

log = logging.getLogger(__name__)

STAGE_REVOKED = "revoked"  # a model's signing key was revoked (key_revoked, desired outcome)
STAGE_REVOCATION = "revocation"  # a revocation list that does not verify (desired_refused)


def adopt_revocations(ring: KeyRing, message: Message, emit: Emit) -> set[str]:
    """Apply a revocation list received on ``message.topic``; the key ids it newly
    revokes. One that does not verify (or is older) is logged and reported as a
    ``desired_refused`` event (stage ``revocation``), and changes nothing."""
    if not message.payload:
        return set()
    try:
        newly = ring.apply_revocations(message.payload, message.topic)
    except VerifyError as exc:
        log.warning("revocation list refused: %s", exc)
        emit(EVENT_DESIRED_REFUSED, stage=STAGE_REVOCATION, reason=str(exc))
        return set()
    if newly:
        log.warning("signing key(s) revoked: %s", ", ".join(sorted(newly)))
    return newly


@dataclass(frozen=True)
class Revoked:
    """A model of a deployment, in ``slot``, signed by the revoked key ``key_id``."""

    slot: str
    ref: ModelRef
    key_id: str

    def to_dict(self) -> dict[str, str | int]:
        return {"slot": self.slot, **self.ref.to_dict(), "key_id": self.key_id}

    def report(self, emit: Emit, stage: str, reason: str, **fields: Any) -> None:
        """Emit the ``key_revoked`` event of this model."""
        emit(
            EVENT_KEY_REVOKED,
            slot=self.slot,
            model=self.ref,
            key_id=self.key_id,
            stage=stage,
            reason=reason,
            **fields,
        )


def revoked_models(deployment: Deployment | None, updater: Updater) -> list[Revoked]:
    """Every model of ``deployment`` whose stored manifest a revoked key signed."""
    found = []
    for slot, spec in sorted((deployment or {}).items()):
        for ref in spec.models:
            kid = updater.revoked_key(ref)
            if kid is not None:
                found.append(Revoked(slot, ref, kid))
    return found


def describe(revoked: Iterable[Revoked]) -> str:
    """``m@1 (key 0123…), …``: one line naming the revoked models and keys."""
    return ", ".join(f"{r.ref} in slot {r.slot} (key {r.key_id})" for r in revoked)


def serve_first_usable(
    candidates: Iterable[Deployment | None],
    *,
    updater: Updater,
    server: DeploymentServer,
    emit: Emit,
    stage: str,
    max_latency_ms: float | None,
) -> Deployment | None:
    """Activate (unwatched) the first usable candidate (None and repeats skipped) and
    return it; None when no candidate is usable (serving is then unchanged)."""
    tried: list[Deployment] = []
    for spec in candidates:
        if spec is None or spec in tried:
            continue
        tried.append(spec)
        revoked = revoked_models(spec, updater)
        for r in revoked:
            why = f"not serving {tiers(spec)}: {describe([r])} is revoked"
            r.report(emit, stage, why, deployment=tiers(spec))
        if revoked:
            continue
        sources = updater.installed(spec)  # integrity at rest, before activation
        try:
            server.activate(spec, sources, watch=False, max_latency_ms=max_latency_ms)
        except DeploymentError as exc:
            emit(
                EVENT_FALLBACK,
                slot=exc.slot,
                model=exc.ref,
                deployment=tiers(spec),
                stage=stage,
                reason=str(exc),
            )
            continue
        return spec
    return None


@dataclass(frozen=True)
class Departure:
    """What :func:`leave_revoked` did: the revoked models served, the deployment now
    served instead (None: still serving them) and the one-line reason reported."""

    revoked: list[Revoked]
    to: Deployment | None
    reason: str


def leave_revoked(
    revoked: list[Revoked],
    candidates: Iterable[Deployment | None],
    *,
    updater: Updater,
    server: DeploymentServer,
    emit: Emit,
    max_latency_ms: float | None,
) -> Departure:
    """Serve the first usable candidate instead of a deployment with ``revoked`` models
    (else keep serving it); one ``key_revoked`` event per revoked model either way."""
    to = serve_first_usable(
        candidates,
        updater=updater,
        server=server,
        emit=emit,
        stage=STAGE_REVOKED,
        max_latency_ms=max_latency_ms,
    )
    reason = f"{describe(revoked)}: signing key revoked; " + (
        f"fell back to {tiers(to)}" if to else "no earlier deployment verifies: still serving it"
    )
    log.error("%s", reason)
    for r in revoked:
        r.report(emit, STAGE_REVOKED, reason, fallback=tiers(to))
    return Departure(revoked, to, reason)
