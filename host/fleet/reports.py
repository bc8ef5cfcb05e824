"""What devices report, read by the host: typed state, telemetry and events, and a fleet view.

Agents publish three schema-2 documents (see the end of :mod:`slimfleet.agent.wire`):
``devices/<id>/state`` (retained), ``devices/<id>/telemetry`` and ``devices/<id>/events``,
plus ``devices/<id>/status`` (retained ``online`` / ``offline``). This module is the one
place on the host that reads them:

* :func:`parse_state`, :func:`parse_telemetry`, :func:`parse_event` turn a decoded JSON
  document into a frozen dataclass. Unknown fields are ignored (agents may add some);
  a missing or mistyped field raises :class:`ReportError` naming it. :func:`decode`
  turns a payload into JSON, refusing bodies over :data:`MAX_REPORT_BYTES`.
* :class:`FleetView` ingests ``(topic, payload)`` messages from any subscription and
  answers one :class:`DeviceReport` per device; commands (status, monitor, exporter,
  deploy's wait for outcomes) read it.

Telemetry counts (requests, errors, escalations, tier runs) are those of the interval
that the document closes, as in schema 1: the view adds them up per slot so that the
exporter can expose monotonic counters.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from slimfleet.agent.deployment import MAX_SLOTS, MAX_TIERS, check_slot
from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.report import STATUSES
from slimfleet.agent.wire import EVENT_TYPES, MAX_SAFE_INT, ModelRef, loads_json

SCHEMA = 2
MAX_REPORT_BYTES = 256 * 1024  # a larger state/telemetry/event body is refused unread
MAX_DEVICES = 10_000  # devices a view tracks (declared ones always; others up to the cap)
RECENT_EVENTS = 100  # fleet-wide recent events a view keeps (for monitor)
DUPLICATE_HOLD_S = 600.0  # a duplicate-id finding is shown this long after its last sign
LATEST_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z: a later (or negative) one is refused

# desired.outcome values (what became of the last desired state a device saw)
OUTCOME_PENDING = "pending"
OUTCOME_SERVING = "serving"
OUTCOME_REFUSED = "refused"
OUTCOME_STALE = "stale"
OUTCOMES = (OUTCOME_PENDING, OUTCOME_SERVING, OUTCOME_REFUSED, OUTCOME_STALE)

REPORT_LEAVES = ("state", "status", "telemetry", "events")
STATUS_ONLINE, STATUS_OFFLINE = b"online", b"offline"

Tiers = tuple[ModelRef, ...]
DeploymentRefs = dict[str, Tiers]  # slot -> the tiers it runs, first to last


class ReportError(SlimfleetError):
    """A device's state, telemetry or event document is malformed (the message says where)."""


# -- parsing ---------------------------------------------------------------------------


def decode(payload: bytes, what: str) -> Any:
    """The JSON in ``payload``; ReportError if it is too large, not UTF-8 or not JSON."""
    if len(payload) > MAX_REPORT_BYTES:
        raise ReportError(f"{what}: {len(payload)} bytes, over the {MAX_REPORT_BYTES} byte limit")
    try:
        return loads_json(payload)
    except ValueError as exc:
        raise ReportError(f"{what}: not valid JSON ({exc})") from None


class _Fields:
    """Typed access to one JSON object; every failure names ``what.key``."""

    def __init__(self, doc: Any, what: str) -> None:
        if not isinstance(doc, dict):
            raise ReportError(f"{what}: expected a JSON object, got {type(doc).__name__}")
        self.doc, self.what = doc, what

    def error(self, key: str, message: str) -> ReportError:
        return ReportError(f"{self.what}.{key}: {message}")

    def _required(self, key: str, value: Any) -> Any:
        if value is None:
            raise self.error(key, "missing")
        return value

    def maybe_number(self, key: str) -> float | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise self.error(key, f"expected a finite number, got {value!r}")
        return float(value)

    def number(self, key: str) -> float:
        return self._required(key, self.maybe_number(key))

    def count(self, key: str, optional: bool = False) -> int:
        """A non-negative integer up to :data:`~slimfleet.agent.wire.MAX_SAFE_INT` (0 when
        optional and absent)."""
        value = self.doc.get(key)
        if value is None:
            return 0 if optional else self._required(key, value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SAFE_INT:
            shown = repr(value) if not isinstance(value, int) or value < MAX_SAFE_INT else "more"
            raise self.error(key, f"expected an integer from 0 to {MAX_SAFE_INT}, got {shown}")
        return value

    def maybe_text(self, key: str) -> str | None:
        """The string at ``key`` with control and format characters escaped (``\\n``
        as ``\\u000a``): a device's text must not forge lines in a terminal or a log."""
        value = self.doc.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        return None if value is None else printable(value)

    def timestamp(self, key: str) -> float:
        """Unix seconds between 0 and :data:`LATEST_TIMESTAMP` (a ts of -1e308 is finite
        and made every age column 300 digits wide)."""
        value = self.number(key)
        if not 0 <= value <= LATEST_TIMESTAMP:
            raise self.error(key, f"expected Unix seconds, got {value!r}")
        return value

    def text(self, key: str) -> str:
        return self._required(key, self.maybe_text(key))

    def maybe_obj(self, key: str) -> _Fields | None:
        value = self.doc.get(key)
        return None if value is None else _Fields(value, f"{self.what}.{key}")

    def obj(self, key: str) -> _Fields:
        return self._required(key, self.maybe_obj(key))

    def maybe_ref(self, key: str) -> ModelRef | None:
        value = self.doc.get(key)
        if value is None:
            return None
        try:
            return ModelRef.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise self.error(key, str(exc)) from None

    def maybe_slots(self, key: str) -> dict[str, Any] | None:
        """An object keyed by valid slot names (at most MAX_SLOTS), values unchecked."""
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, dict) or len(value) > MAX_SLOTS:
            raise self.error(key, f"expected an object of at most {MAX_SLOTS} slots")
        for slot in value:
            try:
                check_slot(slot)
            except ValueError as exc:
                raise self.error(key, str(exc)) from None
        return value

    def maybe_deployment(self, key: str) -> DeploymentRefs | None:
        """``{slot: [{"name", "version"}, ...]}``."""
        slots = self.maybe_slots(key)
        if slots is None:
            return None
        out: DeploymentRefs = {}
        for slot, tiers in slots.items():
            if not isinstance(tiers, list) or len(tiers) > MAX_TIERS:
                raise self.error(f"{key}.{slot}", f"expected a list of at most {MAX_TIERS} models")
            try:
                out[slot] = tuple(ModelRef.from_dict(t) for t in tiers)
            except (TypeError, ValueError) as exc:
                raise self.error(f"{key}.{slot}", str(exc)) from None
        return out

    def schema(self) -> None:
        if self.doc.get("schema") != SCHEMA:
            raise self.error(
                "schema", f"this host reads schema {SCHEMA}, got {self.doc.get('schema')!r}"
            )


@dataclass(frozen=True)
class DesiredReport:
    """What became of the last desired state a device saw (``state.desired``)."""

    seq: int
    issued: float
    expires: float
    rollback: bool
    deployment: DeploymentRefs
    outcome: str  # one of OUTCOMES (an unknown value from a newer agent is kept as is)
    stage: str | None = None
    reason: str | None = None

    @property
    def settled(self) -> bool:
        """The device has finished with this desired state (served, refused or stale)."""
        return self.outcome != OUTCOME_PENDING


@dataclass(frozen=True)
class DeviceState:
    """A device's retained ``state`` document."""

    device: str
    ts: float
    started: float
    status: str  # idle | updating | serving | stale | failed
    deployment: DeploymentRefs
    last_good: DeploymentRefs | None
    previous: DeploymentRefs | None
    desired: DesiredReport | None
    floor: int

    def outcome_for(self, seq: int) -> DesiredReport | None:
        """The report on desired state ``seq``, or None while the device has not seen it."""
        return self.desired if self.desired is not None and self.desired.seq == seq else None


def parse_state(doc: Any, what: str = "state") -> DeviceState:
    """A :class:`DeviceState` from a decoded ``state`` document; ReportError if malformed."""
    f = _Fields(doc, what)
    f.schema()
    desired = None
    d = f.maybe_obj("desired")
    if d is not None:
        desired = DesiredReport(
            seq=d.count("seq"),
            issued=d.timestamp("issued"),
            expires=d.timestamp("expires"),
            rollback=bool(d.doc.get("rollback", False)),
            deployment=d.maybe_deployment("deployment") or {},
            outcome=d.text("outcome"),
            stage=d.maybe_text("stage"),
            reason=d.maybe_text("reason"),
        )
    status = f.text("status")
    if status not in STATUSES:
        raise f.error("status", f"expected one of {', '.join(STATUSES)}, got {status!r}")
    return DeviceState(
        device=f.text("device"),
        ts=f.timestamp("ts"),
        started=f.timestamp("started"),
        status=status,
        deployment=f.maybe_deployment("deployment") or {},
        last_good=f.maybe_deployment("last_good"),
        previous=f.maybe_deployment("previous"),
        desired=desired,
        floor=f.count("floor", optional=True),
    )


@dataclass(frozen=True)
class Latency:
    """Latency percentiles of one interval, in milliseconds (p99 may be absent)."""

    p50: float
    p95: float
    p99: float | None = None


def _latency(f: _Fields, key: str) -> Latency | None:
    lat = f.maybe_obj(key)
    if lat is None:
        return None
    return Latency(lat.number("p50"), lat.number("p95"), lat.maybe_number("p99"))


@dataclass(frozen=True)
class TierStats:
    runs: int
    latency: Latency | None


@dataclass(frozen=True)
class SlotStats:
    """One slot's figures over one telemetry interval."""

    model: ModelRef | None  # the slot's first tier
    requests: int
    errors: int  # model failures only
    client_errors: int  # 4xx, never the model's
    escalations: int  # requests a later tier answered
    throughput_rps: float
    latency: Latency | None
    tiers: dict[str, TierStats]  # "name@version" or "remote" -> runs and latency

    @property
    def escalation_rate(self) -> float | None:
        """Escalations per request in the interval; None without requests."""
        return self.escalations / self.requests if self.requests else None


@dataclass(frozen=True)
class Telemetry:
    """One ``telemetry`` document: the device's figures over its last interval."""

    device: str
    ts: float
    started: float
    uptime_s: float
    interval_s: float
    rss_bytes: int
    cpu_percent: float
    slots: dict[str, SlotStats]


def _slot_stats(f: _Fields) -> SlotStats:
    tiers: dict[str, TierStats] = {}
    t = f.maybe_obj("tiers")
    if t is not None:
        if len(t.doc) > MAX_TIERS + 1:
            raise f.error("tiers", f"more than {MAX_TIERS} local tiers and a remote")
        for name in t.doc:
            if name != "remote":
                try:
                    ModelRef.parse(name)
                except ValueError as exc:
                    raise t.error(
                        name[:80], f"a tier is 'name@version' or 'remote': {exc}"
                    ) from None
            tier = t.obj(name)
            tiers[str(name)] = TierStats(
                tier.count("runs", optional=True), _latency(tier, "latency_ms")
            )
    return SlotStats(
        model=f.maybe_ref("model"),
        requests=f.count("requests", optional=True),
        errors=f.count("errors", optional=True),
        client_errors=f.count("client_errors", optional=True),
        escalations=f.count("escalations", optional=True),
        throughput_rps=f.maybe_number("throughput_rps") or 0.0,
        latency=_latency(f, "latency_ms"),
        tiers=tiers,
    )


def parse_telemetry(doc: Any, what: str = "telemetry") -> Telemetry:
    """A :class:`Telemetry` from a decoded ``telemetry`` document; ReportError if malformed."""
    f = _Fields(doc, what)
    f.schema()
    slots = f.maybe_slots("slots") or {}
    return Telemetry(
        device=f.text("device"),
        ts=f.timestamp("ts"),
        started=f.timestamp("started"),
        uptime_s=f.maybe_number("uptime_s") or 0.0,
        interval_s=f.maybe_number("interval_s") or 0.0,
        rss_bytes=f.count("rss_bytes", optional=True),
        cpu_percent=f.maybe_number("cpu_percent") or 0.0,
        slots={s: _slot_stats(_Fields(v, f"{what}.slots.{s}")) for s, v in slots.items()},
    )


@dataclass(frozen=True)
class Event:
    """One event; ``fields`` is the whole document (type-specific fields included)."""

    type: str
    ts: float
    device: str
    slot: str | None = None
    model: ModelRef | None = None
    seq: int | None = None
    stage: str | None = None
    reason: str | None = None
    fields: dict[str, Any] = field(default_factory=dict, compare=False)


def parse_event(doc: Any, what: str = "event") -> Event:
    """An :class:`Event` from a decoded ``events`` document; ReportError if malformed."""
    f = _Fields(doc, what)
    kind = f.text("type")
    if not kind:
        raise f.error("type", "must not be empty")
    return Event(
        type=kind,
        ts=f.timestamp("ts"),
        device=f.text("device"),
        slot=f.maybe_text("slot"),
        model=f.maybe_ref("model"),
        seq=f.count("seq") if f.doc.get("seq") is not None else None,
        stage=f.maybe_text("stage"),
        reason=f.maybe_text("reason"),
        fields=dict(f.doc),
    )


def printable(text: str) -> str:
    """``text`` with every control, format or unassigned character (newlines, escape
    sequences, bidi overrides) written as ``\\uXXXX``."""
    if text.isprintable():
        return text
    return "".join(c if unicodedata.category(c)[0] != "C" else f"\\u{ord(c):04x}" for c in text)


def event_label(kind: str) -> str:
    """The event type as a metric label: a known type, else ``other`` (bounds cardinality)."""
    return kind if kind in KNOWN_EVENT_TYPES else "other"


KNOWN_EVENT_TYPES = frozenset(EVENT_TYPES)
