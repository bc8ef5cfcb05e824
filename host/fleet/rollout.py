"""Staged rollouts: the driver and its signed, retained record.

A rollout sets one slot of a group's devices to NAME@VERSION wave by wave (cumulative
sizes from :func:`~slimfleet.host.fleet.rollout_policy.wave_plan`). For each wave it
records every device's previous deployment (before sending anything), sends the signed
desired states, waits for the outcomes, then soaks: devices must keep serving the new
version for ``soak_s`` while their telemetry p95 is compared with the p95 they had on
their previous model. :func:`~slimfleet.host.fleet.rollout_policy.decide` says whether
to go on; on abort every touched device gets its previous deployment back as a signed
rollback.

The record lives retained and signed on ``<prefix>/rollouts/<group>``, so ``status``
works from any machine and an interrupted run can ``resume`` or ``abort``.
Bounds: telemetry is kept as one p95 per device and model; documents over the reports
module's MAX_REPORT_BYTES are dropped; a wave takes at most baseline + timeout + soak.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from slimfleet.agent.deployment import SlotSpec, deployment_from_dict, deployment_to_dict
from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.outcomes import read_states, sent, wait_for_outcomes
from slimfleet.host.fleet.reports import ReportError, decode, parse_telemetry
from slimfleet.host.fleet.rollout_policy import (
    Decision,
    DeviceResult,
    RolloutSettings,
    decide,
    wave_plan,
)

log = logging.getLogger(__name__)

RUNNING, DONE, ABORTED = "running", "done", "aborted"
BASELINE_S = 10.0  # at most this long (or the soak) waiting for p95s on the previous model
CHECK_S = 0.5  # how often the soak re-reads device states


def record_topic(fleet: FleetConfig, group: str) -> str:
    return f"{fleet.prefix}/rollouts/{group}"


@dataclass
class Touched:
    """One device a rollout sent the new version to, and what became of it."""

    previous: dict[str, Any]  # its deployment before (wire form), restored on abort
    wave: int
    seq: int | None = None
    issued: float | None = None  # of the desired state sent, to tell it from another host's
    result: str | None = None  # serving, refused, no answer, unhealthy ...
    p95_before: float | None = None
    p95_after: float | None = None


@dataclass
class Record:
    """The rollout's signed, retained state (see the module docstring)."""

    group: str
    slot: str
    target: ModelRef
    settings: RolloutSettings
    waves: list[int]
    key_id: str = ""
    state: str = RUNNING
    reason: str | None = None
    completed: int = 0  # waves that passed
    devices: dict[str, Touched] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc |= {"kind": "rollout", "schema": 1, "target": self.target.to_dict()}
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> Record:
        if not isinstance(doc, dict) or doc.get("kind") != "rollout" or doc.get("schema") != 1:
            raise VerifyError("not a rollout record")
        try:
            fields = {k: doc[k] for k in ("group", "slot", "waves", "key_id", "state")}
            return cls(
                **fields,
                target=ModelRef.from_dict(doc["target"]),
                settings=RolloutSettings(**doc["settings"]),
                reason=doc.get("reason"),
                completed=int(doc["completed"]),
                devices={d: Touched(**t) for d, t in doc["devices"].items()},
                started=float(doc["started"]),
                updated=float(doc["updated"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VerifyError(f"rollout record is malformed: {exc}") from None

    def results(self) -> list[DeviceResult]:
        return [
            DeviceResult(d, t.result == "serving", t.p95_before, t.p95_after)
            for d, t in self.devices.items()
            if t.result is not None
        ]


def read_record(link: BrokerLink, fleet: FleetConfig, group: str) -> Record | None:
    """The group's retained rollout record (signature checked), or None."""
    topic = record_topic(fleet, group)
    payload = link.read_retained([topic]).get(topic)
    return Record.from_dict(fleet.verifier().verify(payload, topic)) if payload else None


def save_record(link: BrokerLink, fleet: FleetConfig, record: Record) -> None:
    signer = fleet.signer()
    record.key_id, record.updated = signer.key_id, time.time()
    link.publish_all([(record_topic(fleet, record.group), signer.sign(record.to_dict()))])


class TelemetryWatch:
    """The latest slot p95 per device and per model serving that slot, from telemetry.

    ``_p95`` (device -> model -> ms) is guarded by ``_lock``: written by paho's network
    thread, read by the driver. Only the group's devices are kept.
    """

    def __init__(self, link: BrokerLink, fleet: FleetConfig, devices: list[str], slot: str):
        self._lock = threading.Lock()
        self._p95: dict[str, dict[ModelRef, float]] = {}
        self._devices, self._slot, self._topics = set(devices), slot, fleet.topics
        self._filter = fleet.topics.all_devices("telemetry")
        self._client = link.client
        self._client.message_callback_add(self._filter, self._on_telemetry)
        self._client.subscribe(self._filter, 0)

    def close(self) -> None:
        self._client.unsubscribe(self._filter)
        self._client.message_callback_remove(self._filter)

    def _on_telemetry(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage):
        parsed = self._topics.parse_device_topic(message.topic)
        if parsed is None or parsed[0] not in self._devices:
            return
        found = slot_p95(message.payload, self._slot)
        if found is not None:
            with self._lock:
                self._p95.setdefault(parsed[0], {})[found[0]] = found[1]

    def p95(self, device: str, model: ModelRef | None) -> float | None:
        with self._lock:
            return self._p95.get(device, {}).get(model) if model else None


def slot_p95(payload: bytes, slot: str) -> tuple[ModelRef, float] | None:
    """(model serving ``slot``, its p95 ms) from a telemetry document, or None."""
    try:
        stats = parse_telemetry(decode(payload, "telemetry")).slots.get(slot)
    except ReportError:
        return None
    if stats is None or stats.model is None or stats.latency is None:
        return None
    return stats.model, stats.latency.p95


def _first_model(deployment: dict[str, Any], slot: str) -> ModelRef | None:
    spec = deployment_from_dict(deployment).get(slot)
    return spec.primary if spec else None


Say = Callable[[str], None]


class Driver:
    """Runs one rollout record to its end (done or aborted), saving it after each step."""

    def __init__(self, fleet: FleetConfig, link: BrokerLink, record: Record, say: Say):
        self.fleet, self.link, self.record, self.say = fleet, link, record, say
        self.settings = record.settings
        self.group = fleet.groups[record.group]
        self.watch = TelemetryWatch(link, fleet, self.group, record.slot)

    def run(self) -> Record:
        try:
            while self.record.state == RUNNING and self.record.completed < len(self.record.waves):
                decision = self._wave(self.record.completed)
                if not decision.proceed:
                    abort(self.fleet, self.link, self.record, decision.reason, self.say)
                    break
                self.record.completed += 1
                save_record(self.link, self.fleet, self.record)
            if self.record.state == RUNNING:
                self.record.state = DONE
                save_record(self.link, self.fleet, self.record)
                self.say(f"rollout of {self.record.target} on {self.record.group}: done")
        finally:
            self.watch.close()
        return self.record

    def _wave(self, index: int) -> Decision:
        record, topics = self.record, self.fleet.topics
        devices = self.group[: record.waves[index]]
        new = [d for d in devices if d not in record.devices]
        currents = deploy.read_current(self.link, self.fleet, new)
        for device in new:  # saved before anything is sent: an abort can always restore
            previous = deployment_to_dict(currents[device].running)
            record.devices[device] = Touched(previous, index)
        save_record(self.link, self.fleet, record)
        unsent = [d for d in devices if record.devices[d].seq is None]  # resume sends these
        self._baseline(unsent)
        slot = {record.slot: SlotSpec((record.target,))}
        for desired in deploy.assign(self.fleet, self.link, slot, unsent) if unsent else []:
            touched = record.devices[desired.device]
            touched.seq, touched.issued = desired.seq, desired.issued
        save_record(self.link, self.fleet, record)
        wave = {d: t for d, t in record.devices.items() if t.wave == index and t.seq}
        seqs = {d: t.seq for d, t in wave.items() if t.seq is not None}
        times = {d: t.issued for d, t in wave.items() if t.issued is not None}
        wait_s = self.settings.timeout_s
        for outcome in wait_for_outcomes(self.link, topics, seqs, wait_s, issued=times):
            record.devices[outcome.device].result = outcome.outcome
        decision = self._soak(seqs)
        touched = [d for d, t in record.devices.items() if t.wave == index]
        serving = sum(record.devices[d].result == "serving" for d in touched)
        regression = (
            f", p95 {decision.p95_regression:+.0%}" if decision.p95_regression is not None else ""
        )
        self.say(
            f"wave {index + 1}/{len(record.waves)}: {len(touched)} device(s), {serving} serving"
            f"{regression}: {decision.reason}"
        )
        return decision

    def _baseline(self, devices: list[str]) -> None:
        """Wait (at most BASELINE_S, and no longer than the soak) for each device's p95
        on its previous model."""
        deadline = time.monotonic() + min(BASELINE_S, self.settings.soak_s)
        for device in devices:
            touched = self.record.devices[device]
            before = _first_model(touched.previous, self.record.slot)
            while before and self.watch.p95(device, before) is None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            touched.p95_before = self.watch.p95(device, before)

    def _soak(self, seqs: dict[str, int]) -> Decision:
        """Watch the wave's devices for soak_s: a device that stops serving the target
        fails; stop early once the decision is to abort."""
        record = self.record
        deadline = time.monotonic() + self.settings.soak_s
        while True:
            states = read_states(self.link, self.fleet.topics, list(seqs))
            for device in seqs:
                touched, state = record.devices[device], states.get(device)
                serves = (
                    state is not None
                    and state.outcome_for(seqs[device]) is not None
                    and state.deployment.get(record.slot, (None,))[0] == record.target
                )
                if touched.result == "serving" and not serves:
                    touched.result = "unhealthy"
                touched.p95_after = self.watch.p95(device, record.target)
            decision = decide(record.results(), self.settings)
            if not decision.proceed or time.monotonic() >= deadline:
                return decision
            time.sleep(min(CHECK_S, max(0.0, deadline - time.monotonic())))


def abort(fleet: FleetConfig, link: BrokerLink, record: Record, reason: str, say: Say) -> Record:
    """Mark the rollout aborted, then send every touched device its previous deployment
    (a signed rollback) and wait for them."""
    record.state, record.reason = ABORTED, reason
    save_record(link, fleet, record)
    previous = {d: deployment_from_dict(t.previous) for d, t in record.devices.items()}
    restored = deploy.restore(fleet, link, previous) if previous else []
    seqs, times = sent(restored)
    outcomes = wait_for_outcomes(link, fleet.topics, seqs, record.settings.timeout_s, issued=times)
    back = sum(o.ok for o in outcomes)
    say(
        f"rollout of {record.target} on {record.group}: aborted ({reason}); "
        f"{back} of {len(restored)} device(s) confirmed back on their previous deployment"
    )
    return record


def start(
    fleet: FleetConfig,
    link: BrokerLink,
    target: ModelRef,
    group: str,
    slot: str,
    settings: RolloutSettings,
) -> Record:
    """A new running record for ``group`` (saved); refused while one is running."""
    fleet.resolve(groups=[group])  # InputError for an unknown group
    existing = read_record(link, fleet, group)
    if existing is not None and existing.state == RUNNING:
        raise InputError(
            f"a rollout of {existing.target} on {group} is still running: "
            f"'slimfleet rollout resume --group {group}' or 'abort' it first"
        )
    deploy.check_published(link, fleet, [target])
    record = Record(
        group, slot, target, settings, wave_plan(settings.waves, len(fleet.groups[group]))
    )
    save_record(link, fleet, record)
    return record


def running(link: BrokerLink, fleet: FleetConfig, group: str) -> Record:
    """The group's running record; InputError when there is none to resume or abort."""
    fleet.resolve(groups=[group])
    record = read_record(link, fleet, group)
    if record is None or record.state != RUNNING:
        state = f"its last rollout is {record.state}" if record else "no rollout was started"
        raise InputError(f"no rollout is running on group {group!r} ({state})")
    return record
