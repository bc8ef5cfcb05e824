"""``slimfleet status``: read the fleet's reports once and describe each device in a row.

:func:`read_fleet` subscribes to every device's state, status, telemetry and events,
takes the retained ones, then listens for ``wait_s`` to live telemetry and events (the
whole time: a second telemetry report is what shows two agents sharing an id, see
:mod:`.fleetview`; ``wait_s=0`` reads the retained reports only). :func:`device_row` turns a report into a JSON-ready
row; :func:`row_cells` into the table cells that ``status`` prints and ``monitor`` draws.
"""

from __future__ import annotations

import time
from typing import Any

from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.fleetview import DeviceReport, FleetView
from slimfleet.host.fleet.mqttio import DEFAULT_TIMEOUT_S
from slimfleet.host.fleet.reports import DeploymentRefs, Event
from slimfleet.host.fleet.watch import FleetFeed, report_filters

DEFAULT_WAIT_S = 3.0
MAX_WAIT_S = 300.0  # --wait is bounded: status is a one-shot read
COLUMNS = (
    "DEVICE",
    "ONLINE",
    "DEPLOYMENT",
    "LAST GOOD",
    "DESIRED",
    "P50/P95 MS",
    "ESC",
    "RSS",
    "LAST EVENT",
    "AGE",
)


def read_fleet(
    fleet: FleetConfig, *, wait_s: float = DEFAULT_WAIT_S, timeout: float = DEFAULT_TIMEOUT_S
) -> FleetView:
    """The fleet's view after its retained reports and ``wait_s`` of live ones."""
    view = FleetView(fleet.topics, list(fleet.devices))
    with FleetFeed(fleet.broker, view.ingest, timeout=timeout) as feed:
        feed.subscribe(report_filters(fleet.topics))
        feed.wait(wait_s)
    return view


def selected(view: FleetView, devices: list[str] | None) -> list[DeviceReport]:
    """The reports of ``devices`` in that order, or every report when None."""
    if devices is None:
        return view.reports()
    wanted = set(devices)
    return [r for r in view.reports() if r.device in wanted]


# -- rows ------------------------------------------------------------------------------


def deployment_text(deployment: DeploymentRefs | None) -> dict[str, list[str]] | None:
    """``{slot: ["name@version", ...tiers]}``."""
    if deployment is None:
        return None
    return {slot: [str(ref) for ref in tiers] for slot, tiers in sorted(deployment.items())}


def device_row(report: DeviceReport, now: float) -> dict[str, Any]:
    """One device as a JSON-ready mapping (the ``--json`` output of ``status``)."""
    state, telemetry, event = report.state, report.telemetry, report.last_event
    desired = state.desired if state is not None else None
    slots = {}
    if telemetry is not None:
        for slot, stats in sorted(telemetry.slots.items()):
            lat = stats.latency
            slots[slot] = {
                "model": str(stats.model) if stats.model else None,
                "p50_ms": lat.p50 if lat else None,
                "p95_ms": lat.p95 if lat else None,
                "requests": stats.requests,
                "errors": stats.errors,
                "throughput_rps": stats.throughput_rps,
                "escalation_rate": stats.escalation_rate if len(stats.tiers) > 1 else None,
            }
    age = report.age_s(now)
    return {
        "device": report.device,
        "declared": report.declared,
        "online": report.online,
        "status": state.status if state else None,
        "deployment": deployment_text(state.deployment) if state else None,
        "last_good": deployment_text(state.last_good) if state else None,
        "desired": None
        if desired is None
        else {
            "seq": desired.seq,
            "outcome": desired.outcome,
            "stage": desired.stage,
            "reason": desired.reason,
            "deployment": deployment_text(desired.deployment),
        },
        "slots": slots,
        "rss_bytes": telemetry.rss_bytes if telemetry else None,
        "cpu_percent": telemetry.cpu_percent if telemetry else None,
        "last_event": None if event is None else event_row(event),
        "age_s": None if age is None else round(age, 1),
        "duplicate": report.duplicate,
        "problem": report.problem,
    }


def event_row(event: Event) -> dict[str, Any]:
    """An event as JSON: the document as the device sent it."""
    return {**event.fields, "type": event.type, "ts": event.ts, "device": event.device}


def _deployment_cell(deployment: dict[str, list[str]] | None) -> str:
    if not deployment:
        return "-" if deployment is None else "(nothing)"
    return " ".join(f"{slot}={'>'.join(tiers)}" for slot, tiers in deployment.items())


def _desired_cell(desired: dict[str, Any] | None) -> str:
    if desired is None:
        return "-"
    text = f"#{desired['seq']} {desired['outcome']}"
    if desired["stage"] or desired["reason"]:
        text += f" ({': '.join(p for p in (desired['stage'], desired['reason']) if p)})"
    return text


def _latency_cell(slots: dict[str, dict[str, Any]]) -> str:
    parts = []
    for slot, s in slots.items():
        figures = "-" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}/{s['p95_ms']:.1f}"
        parts.append(figures if len(slots) == 1 else f"{slot} {figures}")
    return " ".join(parts) or "-"


def _escalation_cell(slots: dict[str, dict[str, Any]]) -> str:
    rates = [(slot, s["escalation_rate"]) for slot, s in slots.items()]
    return " ".join(f"{slot} {rate:.0%}" for slot, rate in rates if rate is not None) or "-"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def row_cells(row: dict[str, Any]) -> list[str]:
    """The table cells of a row, in :data:`COLUMNS` order."""
    online = {True: "online", False: "offline", None: "?"}[row["online"]]
    event = row["last_event"]
    return [
        row["device"] + ("" if row["declared"] else " (undeclared)"),
        online,
        _deployment_cell(row["deployment"]),
        _deployment_cell(row["last_good"]),
        _desired_cell(row["desired"]),
        _latency_cell(row["slots"]),
        _escalation_cell(row["slots"]),
        human_bytes(row["rss_bytes"]),
        "-" if event is None else event["type"],
        human_age(row["age_s"]),
    ]


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """Lines under the table: duplicate ids and malformed reports."""
    lines = []
    for row in rows:
        if row["duplicate"]:
            lines.append(f"! duplicate id {row['device']}: {row['duplicate']}")
        if row["problem"]:
            lines.append(f"! {row['device']}: malformed report: {row['problem']}")
    return lines


def text_table(header: tuple[str, ...], lines: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart."""
    cells = [list(header), *lines]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain text: a header, one line per device, then the notes."""
    return "\n".join([*text_table(COLUMNS, [row_cells(r) for r in rows]), *notes(rows)])


def format_event(event: Event) -> str:
    """One line for ``slimfleet events``."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    where = " ".join(
        p
        for p in (
            f"slot={event.slot}" if event.slot else "",
            f"model={event.model}" if event.model else "",
            f"seq={event.seq}" if event.seq is not None else "",
            f"stage={event.stage}" if event.stage else "",
        )
        if p
    )
    reason = f": {event.reason}" if event.reason else ""
    return f"{stamp} {event.device} {event.type} {where}".rstrip() + reason
