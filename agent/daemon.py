"""The edge agent: threads and lifecycle around the update flow, the desired state and serving.

:class:`Agent` is the whole daemon in-process (tests, benchmarks and the demo use it);
``slimfleet-agent --config agent.yaml`` (:mod:`slimfleet.agent.command`) runs one until
SIGTERM or SIGINT.

On start it re-checks and serves the last good deployment at once (no broker needed;
none with a model signed by a revoked key), starts the HTTP API, then connects. Its
threads: ``listen`` verifies each signed desired state (:mod:`slimfleet.agent.desired`
decides whether it is fresh), adopts revocation lists and reports the link's drops;
``control`` brings serving to the accepted one (:mod:`slimfleet.agent.update` fetches and
installs, :class:`DeploymentServer` loads beside and switches), retries transient
failures with backoff, marks it stale when it expires and leaves a deployment whose
signing key was revoked (:mod:`slimfleet.agent.fallback`); ``telemetry`` publishes.
Every subscription has its byte limit (:mod:`slimfleet.agent.inbox`): desired states and
revocation lists ``DOCUMENT_LIMIT``, manifests ``MANIFEST_LIMIT``, chunks their size.

What the agent publishes (state, telemetry, events) is the schema-2 wire format at
the end of :mod:`slimfleet.agent.wire`; :mod:`slimfleet.agent.report` builds it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from slimfleet.agent.cli_runner import run_cli
from slimfleet.agent.config import AgentConfig
from slimfleet.agent.deployment import SLOT_MAIN, Deployment, DesiredState
from slimfleet.agent.desired import (
    OUTCOME_PENDING,
    OUTCOME_REFUSED,
    OUTCOME_SERVING,
    OUTCOME_STALE,
    STAGE_EXPIRED,
    STAGE_VERIFY,
    Freshness,
    Record,
    expiry_deadline,
    notice,
    restore,
    save_record,
    wait_until,
)
from slimfleet.agent.errors import VerifyError
from slimfleet.agent.fallback import (
    STAGE_REVOKED,
    Revoked,
    adopt_revocations,
    leave_revoked,
    revoked_models,
    serve_first_usable,
)
from slimfleet.agent.inbox import DOCUMENT_LIMIT
from slimfleet.agent.keyring import revocation_topic
from slimfleet.agent.link import Link, Message, Subscription
from slimfleet.agent.outbox import Outbox
from slimfleet.agent.report import state_document, tiers
from slimfleet.agent.serve import HttpApi
from slimfleet.agent.serving import DeploymentError, DeploymentServer
from slimfleet.agent.store import AgentState, ModelStore, StateFile
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.update import Superseded, Timing, UpdateFailed, Updater, check_order
from slimfleet.agent.wire import EVENT_DESIRED_REFUSED, EVENT_DESIRED_STALE

__all__ = ["Agent", "Timing", "main"]

log = logging.getLogger(__name__)

REVOCATIONS_FILE = "revoked.json"  # in the store: the revocation list, kept across restarts


class Agent:
    """One device agent. ``start()`` returns at once; ``stop()`` shuts it down cleanly."""

    def __init__(self, config: AgentConfig, *, timing: Timing | None = None) -> None:
        self.config = config
        self.timing = timing or Timing()
        self.verifier = config.verifier(config.store_dir / REVOCATIONS_FILE)
        self.store = ModelStore(config.store_dir, keep=config.keep_versions)
        self.telemetry = Telemetry(config.device_id)
        self.outbox = Outbox(
            config.device_id,
            self.telemetry,
            publish=lambda topic, payload, qos: self.link.publish(topic, payload, qos=qos),
            events_topic=self._topic("events"),
            telemetry_topic=self._topic("telemetry"),
            seq=lambda: (r := self._followed()) and r.desired.seq,
        )
        self._emit = self.outbox.emit
        self.server = DeploymentServer(
            threads=config.threads,
            watch=config.watch,
            telemetry=self.telemetry,
            on_event=self.outbox.publish_event,
            on_fallback=self._on_watch_fallback,
            on_settled=self._on_settled,
            confidence_functions=config.confidence_functions,
        )
        self.http = (
            HttpApi(self.server, config.http.host, config.http.port, config.http.limits)
            if config.http
            else None
        )
        self.link = Link(
            config.broker,
            config.device_id,
            status_topic=self._topic("status"),
            backoff=self.timing.link,
            on_drop=self.outbox.dropped,  # on the link thread: queues, never blocks
        )
        self._wake = threading.Event()
        self._cancel = threading.Event()  # set: the update in progress is superseded
        self._stop = threading.Event()
        self.updater = Updater(
            config, self.timing, self.link, self.store, self.verifier, self._emit, self._cancel
        )
        #: Guards _state, _record (the desired state followed), _noticed (a newer one that
        #: is not applied: shown in the state document instead), _updating,
        #: _serving_revoked, last_update and _state_file, and orders their writes
        #: to state.json/desired.json (held for a file write, never for a download,
        #: a model load or a publish).
        self._lock = threading.Lock()
        self._state, self._record = restore(self.store, self.verifier)
        self._state_file = StateFile(self.store, self.store.load_state(), self._rewrite_state)
        self._noticed: Record | None = None
        self._updating = False
        self._serving_revoked: list[Revoked] = []  # revoked models served for want of another
        self.last_update: dict[str, Any] | None = None  # figures of the last switch
        self._threads: list[threading.Thread] = []
        self._subscription: Subscription | None = None

    # -- in-process API -----------------------------------------------------------

    def infer(
        self, feeds: Mapping[str, Any], *, slot: str = SLOT_MAIN, cast: bool = False
    ) -> dict[str, np.ndarray]:
        """Run ``slot`` of the serving deployment; the outputs by name."""
        return self.server.predict(slot, feeds, cast=cast).outputs

    @property
    def state(self) -> AgentState:
        with self._lock:
            return self._state

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http else None

    def start(self) -> None:
        """Serve the last good deployment, start HTTP, then connect and follow the desired state."""
        config = self.config
        self._serve_last_good()
        with self._lock:
            record, serving = self._record, self._state.current
        if record and record.outcome == OUTCOME_SERVING and record.desired.deployment != serving:
            self._set_outcome(record, OUTCOME_PENDING)  # e.g. a model failed its integrity check
        if self.http is not None:
            self.http.start()
        self._subscription = self.link.subscribe(
            [self._topic("desired"), revocation_topic(self.config.prefix)],
            max_bytes=DOCUMENT_LIMIT,
            resync=True,  # a flood on these topics must not make the device lose one
        )
        self._publish_state()
        self.link.start()
        self._wake.set()  # a desired state accepted before a restart is resumed at once
        for target, name in (
            (self._listen, "desired"),
            (self._control, "control"),
            (
                partial(self.outbox.report_telemetry, config.telemetry_interval_s, self._stop),
                "telemetry",
            ),
        ):
            thread = threading.Thread(target=target, name=f"agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("agent %s started", self.config.device_id)

    def stop(self) -> None:
        """Cancel work in progress, publish ``offline``, close serving and the HTTP API."""
        self._stop.set()
        self._cancel.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._state_file.close()
        self.link.stop()
        if self.http is not None:
            self.http.stop()
        self.server.close()
        log.info("agent %s stopped", self.config.device_id)

    # -- startup --------------------------------------------------------------------

    def _serve_last_good(self) -> None:
        """Serve the last good deployment (or the previous one), each model re-checked
        first; one with a model signed by a revoked key is never served after a start."""
        state = self.state
        candidates = (state.last_good, state.previous)
        spec = serve_first_usable(candidates, stage="start", **self._fallback_parts())
        with self._lock:
            if spec is not None:
                previous = state.previous if state.previous != spec else None
                self._save_state(replace(state, current=spec, last_good=spec, previous=previous))
            elif state.current is not None:
                self._save_state(replace(state, current=None, last_good=None, previous=None))

    # -- desired states (listen thread) --------------------------------------------------

    def _listen(self) -> None:
        while not self._stop.is_set():
            assert self._subscription is not None
            message = self._subscription.get(timeout=0.5)
            self.outbox.report_drops()
            if message is None:
                continue
            try:
                if message.topic != revocation_topic(self.config.prefix):
                    self._on_desired(message)
                elif adopt_revocations(
                    self.verifier, message, partial(self.outbox.refusal, message)
                ):
                    self._cancel.set()  # an update in progress re-checks its manifests
                    self._wake.set()  # the control thread leaves revoked models
            except Exception:  # a bug must not stop the agent following its desired state
                log.exception("handling %s failed", message.topic)

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            log.info("desired state cleared: keeping the current deployment")
            return
        try:
            desired = DesiredState.from_dict(self.verifier.verify(message.payload, message.topic))
        except VerifyError as exc:
            self.outbox.refusal(message, EVENT_DESIRED_REFUSED, stage=STAGE_VERIFY, reason=str(exc))
            return
        with self._lock:
            seen = [r.envelope for r in (self._record, self._noticed) if r is not None]
            if message.payload in seen:
                return  # the retained one again (reconnect, restart)
            floor = self._state.floor
            if self._record is None:  # desired.json was lost: the accepted one may come back
                floor -= 1
            refusal, record = notice(
                desired,
                message.payload,
                device=self.config.device_id,
                floor=floor,
                enrolled=self._state.enrolled,
                now=time.time(),
                max_skew_s=self.config.max_clock_skew_s,
            )
            if refusal is None:  # followed from now on
                self._save_state(replace(self._state, floor=max(floor, desired.seq)))
                self._record, self._noticed = record, None
                save_record(self.store.root, record, self._freshness())
            elif record is not None:  # shown to the host; the followed one stays followed
                self._noticed = record
        if refusal is not None:
            kind = EVENT_DESIRED_STALE if refusal.stage == STAGE_EXPIRED else EVENT_DESIRED_REFUSED
            fields = {"seq": desired.seq, "stage": refusal.stage, "reason": refusal.reason}
            if self.outbox.refusal(message, kind, **fields):
                log.warning("desired seq %d not applied: %s", desired.seq, refusal.reason)
        else:
            log.info("desired seq %d: %s", desired.seq, tiers(desired.deployment))
            self._cancel.set()  # whatever is being applied is superseded
            self._wake.set()
        if record is not None:
            self._publish_state()

    def _freshness(self) -> Freshness:
        return Freshness(self._state.floor, self._state.enrolled)

    # -- following the desired state (control thread) -----------------------------------

    def _control(self) -> None:
        attempt, retry_at = 0, None
        while not self._stop.is_set():
            woken = self._wake.wait(wait_until(retry_at, expiry_deadline(self._followed())))
            self._wake.clear()
            with self._lock:
                record = self._record
                if not self._stop.is_set():
                    self._cancel.clear()
            if self._stop.is_set():
                return
            self._leave_revoked()
            if record is None or self._went_stale(record) or record.outcome != OUTCOME_PENDING:
                retry_at = None
                continue
            if woken:
                attempt = 0
            try:
                self._apply(record)
            except Superseded:
                continue
            except UpdateFailed as failure:
                self._failed(record, failure.stage, failure.reason, failure.permanent)
                if failure.permanent:
                    retry_at = None
                    continue
            except Exception as exc:  # a bug must not kill the agent: report, retry later
                log.exception("applying desired seq %d failed", record.desired.seq)
                self._failed(record, "internal", repr(exc), permanent=False)
            else:
                self._leave_revoked()  # a new deployment clears serving_revoked
                retry_at = None
                continue
            retry_at = time.monotonic() + self.timing.retry.delay(attempt)
            attempt += 1

    def _leave_revoked(self) -> None:
        """Fall back off a serving deployment with a model signed by a revoked key: to the
        last good deployment whose models all verify, else the previous one; with neither,
        keep serving it and say so (``key_revoked`` events, ``serving_revoked`` in state)."""
        with self._lock:
            state, reported = self._state, self._serving_revoked
        revoked = revoked_models(state.current, self.updater)
        if revoked == reported:
            return  # nothing revoked, or already reported as served for want of another
        left = None
        if revoked:
            others = [s for s in (state.last_good, state.previous) if s != state.current]
            left = leave_revoked(revoked, others, **self._fallback_parts())
        with self._lock:
            if left is not None and left.to is not None:
                self._save_state(replace(self._state, current=left.to, last_good=left.to))
            self._serving_revoked = left.revoked if left is not None and not left.to else []
            record = self._record
        if left is not None and record and record.desired.deployment == state.current:
            self._failed(record, STAGE_REVOKED, left.reason, permanent=True)
        self._publish_state()

    def _fallback_parts(self) -> dict[str, Any]:  # fallback.serve_first_usable's
        parts = {"updater": self.updater, "server": self.server, "emit": self._emit}
        return {**parts, "max_latency_ms": self.config.smoke_max_latency_ms}

    def _went_stale(self, record: Record) -> bool:
        """Mark ``record`` stale when it expired; the serving deployment keeps serving."""
        if record.outcome not in (OUTCOME_PENDING, OUTCOME_SERVING) or not record.desired.expired():
            return False
        reason = (
            f"expired at {time.ctime(record.desired.expires)}; still serving the last deployment"
        )
        if not self._set_outcome(record, OUTCOME_STALE, STAGE_EXPIRED, reason):
            return False
        self._emit(EVENT_DESIRED_STALE, seq=record.desired.seq, stage=STAGE_EXPIRED, reason=reason)
        self._publish_state()
        return True

    def _apply(self, record: Record) -> None:
        desired = record.desired
        with self._lock:
            state = self._state
        if state.current == desired.deployment and self.server.ready():
            self._set_outcome(record, OUTCOME_SERVING)
            self._publish_state()
            return
        check_order(desired, state.last_good or state.current or {})
        self._set_updating(True)
        try:
            started = time.monotonic()
            sources, figures = self.updater.prepare(desired)
            watched = bool(state.current) and self.config.watch.window_s > 0
            swap = self.server.activate(
                desired.deployment,
                sources,
                watch=watched,
                max_latency_ms=self.config.smoke_max_latency_ms,
            )
        except DeploymentError as exc:
            raise UpdateFailed(exc.stage, str(exc), permanent=True) from None
        finally:
            self._set_updating(False)
        figures.update(
            seq=desired.seq,
            load_s=round(swap["load_ms"] / 1000, 4),
            activate_s=round(swap["total_ms"] / 1000, 4),
            total_s=round(time.monotonic() - started, 4),
        )
        with self._lock:
            last_good = self._state.last_good if watched else desired.deployment
            self._save_state(
                replace(
                    self._state,
                    current=desired.deployment,
                    last_good=last_good,
                    previous=self._state.current,
                )
            )
            self.last_update = figures
        self._set_outcome(record, OUTCOME_SERVING)
        self._publish_state()

    def _failed(self, record: Record, stage: str, reason: str, permanent: bool) -> None:
        """Report a failure to reach ``record``; the serving deployment is unchanged."""
        log.warning("desired seq %d: %s failed: %s", record.desired.seq, stage, reason)
        outcome = OUTCOME_REFUSED if permanent else OUTCOME_PENDING
        if self._set_outcome(record, outcome, stage, reason) and permanent:
            self._emit(EVENT_DESIRED_REFUSED, seq=record.desired.seq, stage=stage, reason=reason)
        self._publish_state()

    def _set_outcome(
        self, record: Record, outcome: str, stage: str | None = None, reason: str | None = None
    ) -> bool:
        """Record what became of ``record`` if it is still the one followed; persist it."""
        with self._lock:
            current = self._record
            if current is None or current.envelope != record.envelope:
                return False
            if (current.outcome, current.stage, current.reason) == (outcome, stage, reason):
                return True
            self._record = current.with_outcome(outcome, stage, reason)
            if outcome != OUTCOME_PENDING:  # transient failures need not survive a restart
                save_record(self.store.root, self._record, self._freshness())
        return True

    def _set_updating(self, updating: bool) -> None:
        with self._lock:
            self._updating = updating
        self._publish_state()

    # -- DeploymentServer callbacks (watch thread) ----------------------------------------

    def _on_watch_fallback(self, bad: Deployment, to: Deployment, reason: str) -> None:
        with self._lock:
            state = self._state
            last_good = to if state.last_good in (None, bad) else state.last_good
            self._save_state(replace(state, current=to, last_good=last_good, previous=None))
            record = self._record
        if record is not None and record.desired.deployment == bad:
            self._failed(record, "watch", reason, permanent=True)
        self._publish_state()
        self._wake.set()  # the control thread re-checks it for revoked keys

    def _on_settled(self, spec: Deployment) -> None:
        with self._lock:
            if self._state.current == spec:
                self._save_state(replace(self._state, last_good=spec))
        self._publish_state()

    # -- state and events ---------------------------------------------------------------

    def _save_state(self, state: AgentState) -> None:
        """Adopt ``state``, persist it and drop versions nothing points at any more (a full
        disk: from memory, see :class:`StateFile`); the caller holds ``_lock``."""
        self._state = state
        self._state_file.save(state)

    def _rewrite_state(self) -> None:  # on a timer thread, while state.json lags (full disk)
        with self._lock:
            self._save_state(self._state)

    def state_document(self) -> dict[str, Any]:
        """What the agent publishes, retained, on ``devices/<id>/state``."""
        serving = self.server.current()
        with self._lock:
            doc = state_document(
                device=self.config.device_id,
                started=self.telemetry.started_at,
                serving=serving,
                state=self._state,
                record=self._noticed or self._record,
                followed=self._record,
                updating=self._updating,
                last_update=self.last_update,
            )
            doc["serving_revoked"] = [r.to_dict() for r in self._serving_revoked]
            return doc

    def _publish_state(self) -> None:
        self.link.set_retained(self._topic("state"), json.dumps(self.state_document()).encode())

    def _followed(self) -> Record | None:
        with self._lock:
            return self._record

    def _topic(self, leaf: str) -> str:
        return self.config.topics.device(self.config.device_id, leaf)


def main() -> None:
    """Console-script entry point (``slimfleet-agent``, see :mod:`slimfleet.agent.command`)."""
    from slimfleet.agent.command import cli  # late: the command module imports Agent

    run_cli(cli, "slimfleet-agent")
