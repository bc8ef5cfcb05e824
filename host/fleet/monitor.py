"""``slimfleet monitor``: the status table and the latest events, redrawn in place.

One long-lived subscription feeds a :class:`~.fleetview.FleetView`; every ``refresh_s``
the screen is redrawn from it with rich's ``Live`` (on a terminal it redraws in place; to
a pipe it prints the last frame when it stops). It runs until Ctrl-C or, when given,
``duration_s``; ``once`` waits for reports like ``status`` and prints one frame. Undeclared
devices silent for :data:`FORGET_AFTER_S` leave the table.
"""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.fleetview import FleetView
from slimfleet.host.fleet.mqttio import DEFAULT_TIMEOUT_S
from slimfleet.host.fleet.status import (
    COLUMNS,
    device_row,
    format_event,
    notes,
    read_fleet,
    row_cells,
    selected,
)
from slimfleet.host.fleet.stopsignals import stop_signals
from slimfleet.host.fleet.watch import FleetFeed, report_filters

PIPE_WIDTH = 200  # columns drawn when the output is not a terminal
SHOWN_EVENTS = 8  # newest events under the table
FORGET_AFTER_S = 3600.0

ONLINE_STYLE = {True: "green", False: "red", None: "yellow"}


def render(view: FleetView, devices: list[str] | None, title: str) -> Group:
    """One frame: the device table, its notes and the newest events."""
    now = time.time()
    rows = [device_row(r, now) for r in selected(view, devices)]
    table = Table(title=title, title_justify="left", expand=False)
    for column in COLUMNS:
        table.add_column(column, no_wrap=column in ("DEVICE", "ONLINE", "AGE"))
    for row in rows:
        cells = row_cells(row)
        styled = [Text(c) for c in cells]
        styled[1].stylize(ONLINE_STYLE[row["online"]])
        if row["desired"] and row["desired"]["outcome"] == "refused":
            styled[4].stylize("bold red")
        table.add_row(*styled)
    wanted = None if devices is None else set(devices)
    events = [e for e in view.recent_events() if wanted is None or e.device in wanted]
    parts: list = [table]
    parts += [Text(line, style="bold red") for line in notes(rows)]
    parts.append(Text("latest events:", style="bold"))
    parts += [Text(format_event(e)) for e in events[-SHOWN_EVENTS:]] or [Text("  (none yet)")]
    return Group(*parts)


def run_monitor(
    fleet: FleetConfig,
    *,
    devices: list[str] | None = None,
    refresh_s: float = 2.0,
    duration_s: float | None = None,
    once: bool = False,
    wait_s: float = 3.0,
    console: Console | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Draw the fleet until Ctrl-C (returns normally) or ``duration_s`` seconds."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not squeeze the table into 80
            console.width = PIPE_WIDTH
    title = f"slimfleet {fleet.prefix} on {fleet.broker.url}"
    if once:
        console.print(render(read_fleet(fleet, wait_s=wait_s, timeout=timeout), devices, title))
        return
    view = FleetView(fleet.topics, list(fleet.devices))
    with FleetFeed(fleet.broker, view.ingest, timeout=timeout, reconnect=True) as feed:
        feed.subscribe(report_filters(fleet.topics))
        deadline = None if duration_s is None else time.monotonic() + duration_s
        frame = render(view, devices, title)
        with stop_signals() as stop, Live(frame, console=console, auto_refresh=False) as live:
            while deadline is None or time.monotonic() < deadline:
                pause = (
                    refresh_s if deadline is None else min(refresh_s, deadline - time.monotonic())
                )
                if stop.wait(max(0.0, pause)):
                    break
                view.forget(FORGET_AFTER_S)
                state = "" if feed.connected.is_set() else "  [broker unreachable: retrying]"
                live.update(render(view, devices, title + state), refresh=True)
        if stop.is_set():
            console.print("monitor stopped")
