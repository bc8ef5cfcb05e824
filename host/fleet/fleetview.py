"""The fleet as its reports describe it: one :class:`DeviceReport` per device.

A :class:`FleetView` is fed ``(topic, payload)`` messages from any subscription to the
fleet's ``devices/+/state|status|telemetry|events`` topics (see :mod:`.reports` for the
documents) and answers per-device reports. It never talks to a broker itself, so a
command, the exporter and tests feed it the same way.

Bounds: at most ``max_devices`` devices (declared ones always; the reports of further
undeclared ones are counted in :attr:`FleetView.dropped` and ignored), per device the
slots and tiers of its latest telemetry only, :data:`~.reports.RECENT_EVENTS` recent events
fleet-wide, event counts by known type (other types count as ``other``), and payloads up
to :data:`~.reports.MAX_REPORT_BYTES`.

Duplicate device ids (two agents configured with the same id) are detected from the
``started`` time (the agent's start, unix seconds) that every state and telemetry
document carries. One agent only ever moves forward: after a restart its old ``started``
never comes back. So a report whose ``started`` was already seen from this device but is
not the most recent one seen (A, B, then A again: two agents alternating) marks the
device as duplicated for :data:`~.reports.DUPLICATE_HOLD_S` after the last such sign. A
restart, even with a clock that went backwards, gives a new value and is not flagged.
A one-shot reader (``slimfleet status``) sees it only when both agents report within its
wait; a long-running one (monitor, exporter) sees it as soon as both have reported twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from slimfleet.agent.wire import Topics, check_name
from slimfleet.host.fleet.reports import (
    DUPLICATE_HOLD_S,
    MAX_DEVICES,
    RECENT_EVENTS,
    REPORT_LEAVES,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    DeviceState,
    Event,
    ReportError,
    SlotStats,
    Telemetry,
    decode,
    event_label,
    parse_event,
    parse_state,
    parse_telemetry,
)

log = logging.getLogger(__name__)

STARTS_KEPT = 4  # distinct `started` values remembered per device for duplicate detection


@dataclass
class SlotTotals:
    """Counts of one slot added up over the telemetry this view received."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    escalations: int = 0
    tier_runs: dict[str, int] = field(default_factory=dict)

    def added(self, stats: SlotStats) -> SlotTotals:
        """These totals plus one interval; tiers absent from it are dropped (bounded)."""
        return SlotTotals(
            self.requests + stats.requests,
            self.errors + stats.errors,
            self.client_errors + stats.client_errors,
            self.escalations + stats.escalations,
            {t: self.tier_runs.get(t, 0) + s.runs for t, s in stats.tiers.items()},
        )


@dataclass
class DeviceReport:
    """Everything known about one device. Times in ``received`` are the host's clock;
    ``ts`` fields inside documents are the device's."""

    device: str
    declared: bool
    online: bool | None = None  # None: no retained status
    state: DeviceState | None = None
    telemetry: Telemetry | None = None
    last_event: Event | None = None
    events: dict[str, int] = field(default_factory=dict)  # event_label(type) -> count
    totals: dict[str, SlotTotals] = field(default_factory=dict)  # slot -> totals
    received: float | None = None  # when the newest message about this device arrived
    problem: str | None = None  # the last malformed report, one line
    duplicate: str | None = None  # why this id looks used by two agents
    duplicate_seen: float = 0.0
    starts: list[float] = field(default_factory=list)  # distinct `started`, oldest first

    @property
    def newest_ts(self) -> float | None:
        """The device-clock time of its newest state, telemetry or event."""
        stamps = [d.ts for d in (self.state, self.telemetry, self.last_event) if d is not None]
        return max(stamps) if stamps else None

    def age_s(self, now: float) -> float | None:
        newest = self.newest_ts
        return None if newest is None else max(0.0, now - newest)

    def copy(self) -> DeviceReport:
        return replace(
            self,
            events=dict(self.events),
            totals=dict(self.totals),
            starts=list(self.starts),
        )


class FleetView:
    """Per-device reports built from the messages it is fed; thread-safe.

    ``_lock`` guards ``_devices``, ``_recent``, ``_rejected`` and ``_dropped``: the paho
    thread feeds the view while a scrape or a redraw reads it.
    """

    def __init__(
        self,
        topics: Topics,
        declared: Iterable[str] = (),
        *,
        max_devices: int = MAX_DEVICES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.max_devices = max_devices
        self.clock = clock
        self._lock = threading.Lock()
        self._devices = {d: DeviceReport(d, declared=True) for d in declared}
        self._recent: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self._rejected = 0  # malformed reports
        self._dropped = 0  # reports of undeclared devices over max_devices

    # -- feeding ---------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes) -> str | None:
        """Take one message; return the device id it was about, None if it was not a report.

        A malformed report is recorded as the device's ``problem`` and otherwise ignored.
        An empty payload (a cleared retained message) forgets the state or status.
        """
        parsed = self.topics.parse_device_topic(topic)
        if parsed is None or parsed[1] not in REPORT_LEAVES:
            return None
        device, leaf = parsed
        now = self.clock()
        with self._lock:
            report = self._devices.get(device)
            if report is None:
                if not _valid_id(device):  # not an id an agent accepts: never a label
                    self._rejected += 1
                    return None
                if len(self._devices) >= self.max_devices:
                    self._dropped += 1
                    return None
                report = self._devices[device] = DeviceReport(device, declared=False)
            report.received = now
            try:
                self._apply(report, leaf, payload, now)
            except ReportError as exc:
                self._rejected += 1
                report.problem = str(exc)
                log.debug("%s", exc)
        return device

    def _apply(self, report: DeviceReport, leaf: str, payload: bytes, now: float) -> None:
        where = f"devices/{report.device}/{leaf}"
        if leaf == "status":
            if payload not in (STATUS_ONLINE, STATUS_OFFLINE, b""):
                raise ReportError(f"{where}: expected 'online' or 'offline', got {payload[:40]!r}")
            report.online = None if not payload else payload == STATUS_ONLINE
            return
        if leaf == "state" and not payload:
            report.state = None
            return
        doc = decode(payload, where)
        if leaf == "events":
            event = parse_event(doc, where)
            self._check_device(event.device, where, report)
            report.last_event = event
            label = event_label(event.type)
            report.events[label] = report.events.get(label, 0) + 1
            self._recent.append(event)
            return
        if leaf == "state":
            state = parse_state(doc, where)
            self._check_device(state.device, where, report)
            report.state = state
            self._note_started(report, state.started, now)
            return
        telemetry = parse_telemetry(doc, where)
        self._check_device(telemetry.device, where, report)
        report.telemetry = telemetry
        report.totals = {
            slot: report.totals.get(slot, SlotTotals()).added(stats)
            for slot, stats in telemetry.slots.items()
        }
        self._note_started(report, telemetry.started, now)

    @staticmethod
    def _check_device(named: str, where: str, report: DeviceReport) -> None:
        if named != report.device:
            raise ReportError(f"{where}: the document names device {named!r}")

    @staticmethod
    def _note_started(report: DeviceReport, started: float, now: float) -> None:
        """The duplicate-id rule of the module docstring."""
        started = round(started, 3)
        starts = report.starts
        if started in starts and started != starts[-1]:
            report.duplicate = (
                f"two agents report as {report.device}: reports from agents started at "
                f"{_clock(started)} and {_clock(starts[-1])} alternate"
            )
            report.duplicate_seen = now
            starts.remove(started)
        if started not in starts:
            starts.append(started)
            del starts[:-STARTS_KEPT]

    # -- reading ---------------------------------------------------------------
    @property
    def rejected(self) -> int:
        """Malformed reports (and reports on topics no agent could own) ignored so far."""
        with self._lock:
            return self._rejected

    @property
    def dropped(self) -> int:
        """Reports of undeclared devices ignored because max_devices were tracked."""
        with self._lock:
            return self._dropped

    def get(self, device: str) -> DeviceReport | None:
        """A copy of one device's report, None if nothing is known about it."""
        with self._lock:
            report = self._devices.get(device)
            return None if report is None else self._snapshot(report)

    def reports(self) -> list[DeviceReport]:
        """Copies of every report: declared devices in fleet.yaml order, then others by id."""
        with self._lock:
            declared = [r for r in self._devices.values() if r.declared]
            others = sorted((r for r in self._devices.values() if not r.declared), key=_id)
            return [self._snapshot(r) for r in (*declared, *others)]

    def recent_events(self) -> list[Event]:
        """The newest events fleet-wide, oldest first."""
        with self._lock:
            return list(self._recent)

    def forget(self, silent_for_s: float) -> list[str]:
        """Drop undeclared devices from which nothing arrived for ``silent_for_s``."""
        cutoff = self.clock() - silent_for_s
        with self._lock:
            gone = [
                d
                for d, r in self._devices.items()
                if not r.declared and (r.received is None or r.received < cutoff)
            ]
            for device in gone:
                del self._devices[device]
        return gone

    def _snapshot(self, report: DeviceReport) -> DeviceReport:
        copy = report.copy()
        if copy.duplicate and self.clock() - copy.duplicate_seen > DUPLICATE_HOLD_S:
            copy.duplicate = None
        return copy


def _valid_id(device: str) -> bool:
    try:
        check_name(device)
    except ValueError:
        return False
    return True


def _id(report: DeviceReport) -> str:
    return report.device


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"
