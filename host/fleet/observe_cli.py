"""``slimfleet status | events | models | monitor | exporter``: watching the fleet.

Thin click layers over :mod:`.status`, :mod:`.catalog`, :mod:`.monitor` and
:mod:`.exporter`. Durations are given as ``3s``, ``500ms``, ``2m`` or plain seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from slimfleet.agent.errors import InputError
from slimfleet.agent.wire import check_name
from slimfleet.host.fleet.catalog import format_catalog, read_catalog
from slimfleet.host.fleet.cli import PORT, fleet_option, json_option
from slimfleet.host.fleet.config import FleetConfig, load_fleet
from slimfleet.host.fleet.exporter import DEFAULT_MAX_DEVICES, DEFAULT_STALE_AFTER_S, run_exporter
from slimfleet.host.fleet.reports import ReportError, decode, parse_event
from slimfleet.host.fleet.status import (
    DEFAULT_WAIT_S,
    MAX_WAIT_S,
    device_row,
    event_row,
    format_event,
    format_table,
    read_fleet,
    selected,
)
from slimfleet.host.fleet.stopsignals import stop_signals
from slimfleet.host.fleet.watch import FleetFeed
from slimfleet.host.units import Duration

group_option = click.option("--group", help="Only the devices of this group of the fleet file.")
wait_option = click.option(
    "--wait",
    "wait_s",
    type=Duration(MAX_WAIT_S),
    default=f"{DEFAULT_WAIT_S:g}s",
    show_default=True,
    help="How long to wait for live reports (telemetry, events).",
)


def _targets(fleet: FleetConfig, group: str | None) -> list[str] | None:
    return fleet.resolve(groups=[group]) if group else None


@click.command()
@group_option
@wait_option
@fleet_option
@json_option
def status(group: str | None, wait_s: float, fleet_path: Path, as_json: bool) -> None:
    """One row per device: online, deployment, last good, desired outcome, latency, memory.

    Lists the devices of the fleet file and any other device seen on the broker. Reads
    the retained state and status, then listens to telemetry for --wait (make it longer
    than the agents' telemetry interval to see every device's latency). Device ids used
    by two agents are flagged under the table.
    """
    fleet = load_fleet(fleet_path)
    devices = _targets(fleet, group)
    view = read_fleet(fleet, wait_s=wait_s)
    now = time.time()
    rows = [device_row(r, now) for r in selected(view, devices)]
    if as_json:
        doc = {"broker": fleet.broker.url, "prefix": fleet.prefix, "devices": rows}
        click.echo(json.dumps(doc, sort_keys=True))
    else:
        click.echo(format_table(rows))


@click.command()
@click.option("--follow", "-f", is_flag=True, help="Stream events until Ctrl-C.")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@group_option
@wait_option
@fleet_option
@json_option
def events(
    follow: bool,
    devices: tuple[str, ...],
    group: str | None,
    wait_s: float,
    fleet_path: Path,
    as_json: bool,
) -> None:
    """Print device events as they arrive (one JSON object per line with --json).

    Events are not retained: without --follow this prints what arrives within --wait.
    """
    fleet = load_fleet(fleet_path)
    for device in devices:
        try:
            check_name(device)
        except ValueError as exc:
            raise InputError(f"--device: {exc}") from None
    wanted = [*(_targets(fleet, group) or []), *devices]
    topics = fleet.topics
    filters = [topics.device(d, "events") for d in dict.fromkeys(wanted)]

    def show(topic: str, payload: bytes) -> None:
        try:
            event = parse_event(decode(payload, topic), topic)
            if (event.device, "events") != topics.parse_device_topic(topic):
                raise ReportError(f"{topic}: the event names device {event.device!r}")
        except ReportError as exc:
            click.echo(f"warning: {exc}", err=True)
            return
        click.echo(json.dumps(event_row(event), sort_keys=True) if as_json else format_event(event))

    with stop_signals() as stop, FleetFeed(fleet.broker, show, reconnect=follow) as feed:
        feed.subscribe(filters or [topics.all_devices("events")])
        feed.wait(float("inf") if follow else wait_s, until=stop.is_set)
        if stop.is_set():
            click.echo("stopped", err=True)


@click.command()
@fleet_option
@json_option
def models(fleet_path: Path, as_json: bool) -> None:
    """What is published (size, chunks, key, expiry, signature) and which devices run it.

    Reads only the retained manifests, never the chunks, and checks each signature
    against the fleet's public key.
    """
    fleet = load_fleet(fleet_path)
    published = read_catalog(fleet)
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in published], sort_keys=True))
    else:
        click.echo(format_catalog(published))


@click.command()
@click.option(
    "--refresh",
    "refresh_s",
    type=Duration(3600, minimum=0.1),
    default="2s",
    show_default=True,
    help="Redraw interval.",
)
@click.option("--duration", "duration_s", type=Duration(), help="Stop after this long.")
@click.option("--once", is_flag=True, help="Wait like 'status', print one frame, exit.")
@group_option
@wait_option
@fleet_option
def monitor(
    refresh_s: float,
    duration_s: float | None,
    once: bool,
    group: str | None,
    wait_s: float,
    fleet_path: Path,
) -> None:
    """A live view of the fleet, redrawn in place until Ctrl-C."""
    from slimfleet.host.fleet.monitor import run_monitor  # rich: the host extra only

    if once and duration_s is not None:
        raise click.UsageError("--once prints one frame; --duration is for the live view")

    fleet = load_fleet(fleet_path)
    run_monitor(
        fleet,
        devices=_targets(fleet, group),
        refresh_s=refresh_s,
        duration_s=duration_s,
        once=once,
        wait_s=wait_s,
    )


@click.command()
@click.option("--port", type=PORT, required=True, help="HTTP port.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--share",
    metavar="GROUP",
    help="Split telemetry and events with other exporters of GROUP (MQTT 5 shared subscription).",
)
@click.option(
    "--max-devices",
    type=click.IntRange(1, 100_000),
    default=DEFAULT_MAX_DEVICES,
    show_default=True,
    help="Devices tracked (label cardinality cap).",
)
@click.option(
    "--stale-after",
    "stale_after_s",
    type=Duration(minimum=1),
    default=f"{DEFAULT_STALE_AFTER_S:g}s",
    show_default=True,
    help="Drop a device's telemetry gauges when its last telemetry is older.",
)
@fleet_option
def exporter(
    port: int,
    host: str,
    share: str | None,
    max_devices: int,
    stale_after_s: float,
    fleet_path: Path,
) -> None:
    """Serve the fleet's reports as Prometheus metrics on http://HOST:PORT/metrics.

    Runs until Ctrl-C or SIGTERM.
    """
    fleet = load_fleet(fleet_path)
    with stop_signals() as stop:
        run_exporter(
            fleet,
            port=port,
            host=host,
            share=share,
            max_devices=max_devices,
            stale_after_s=stale_after_s,
            stop=stop,
            ready=lambda line: click.echo(line, err=True),
        )
    click.echo("stopped", err=True)
