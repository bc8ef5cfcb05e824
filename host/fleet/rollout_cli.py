"""``slimfleet rollout NAME@VERSION | status | resume | abort``: staged rollouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from slimfleet.agent.deployment import SLOT_MAIN, check_slot
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet import rollout as rollouts
from slimfleet.host.fleet.cli import fleet_option, json_option
from slimfleet.host.fleet.config import FleetConfig, load_fleet
from slimfleet.host.fleet.deploy_cli import parse_ref, with_options
from slimfleet.host.units import parse_duration

log = logging.getLogger(__name__)


class _RolloutGroup(click.Group):
    """``rollout NAME@VERSION ...`` starts a rollout (the hidden ``start`` command)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_RolloutGroup)
def rollout() -> None:
    """Staged rollouts that stop themselves.

    \b
    slimfleet rollout NAME@VERSION --group G [--slot S] [--waves 1,10,50,100%]
        [--min-devices N] [--max-failure-rate R] [--max-p95-regression X]
        [--soak 60s] [--timeout 120s] [--json]
    slimfleet rollout status|resume|abort --group G

    Waves are cumulative device counts, or percentages with '%'. Defaults come from
    fleet.yaml 'rollouts:' (per group). Exit 0 done, 1 aborted, 2 bad input.
    """


group_options = [click.option("--group", help="The group (required)."), fleet_option, json_option]


def _number(text: str | None, what: str, kind: type) -> Any:
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise InputError(f"{what}: expected {noun}, got {text!r}") from None


def _group_of(fleet: FleetConfig, group: str | None) -> str:
    if not group:
        raise InputError("name the group with --group")
    fleet.resolve(groups=[group])  # an unknown group is an InputError naming the known ones
    return group


def _finish(record: rollouts.Record, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(record.to_dict(), sort_keys=True))
    if record.state == rollouts.ABORTED:
        raise SlimfleetError(f"the rollout of {record.target} on {record.group} was aborted")


@rollout.command("start", hidden=True)
@click.argument("model", metavar="NAME@VERSION")
@click.option("--group", help="The group to roll out to (required).")
@click.option("--slot", default=SLOT_MAIN, show_default=True, help="The slot to set.")
@click.option("--waves", help="Cumulative wave sizes, e.g. 1,10,50,100%.")
@click.option("--min-devices", help="Devices reported before failures can abort.")
@click.option("--max-failure-rate", help="Abort above this failed fraction (0..1).")
@click.option("--max-p95-regression", help="Abort when p95 grows more than this (0.2 = 20%).")
@click.option("--soak", help="How long each wave must stay healthy (e.g. 60s).")
@click.option("--timeout", "timeout_s", help="How long each device has to answer.")
@fleet_option
@json_option
def rollout_start(
    model: str,
    group: str | None,
    slot: str,
    waves: str | None,
    min_devices: str | None,
    max_failure_rate: str | None,
    max_p95_regression: str | None,
    soak: str | None,
    timeout_s: str | None,
    fleet_path: Path,
    as_json: bool,
) -> None:
    """Start a staged rollout of NAME@VERSION to a group's slot."""
    ref = parse_ref(model, "NAME@VERSION")
    try:
        check_slot(slot)
    except ValueError as exc:
        raise InputError(f"--slot: {exc}") from None
    fleet = load_fleet(fleet_path)
    group = _group_of(fleet, group)
    try:
        settings = (
            fleet.rollout_settings(group)
            .override(
                waves=waves,
                min_devices=_number(min_devices, "--min-devices", int),
                max_failure_rate=_number(max_failure_rate, "--max-failure-rate", float),
                max_p95_regression=_number(max_p95_regression, "--max-p95-regression", float),
                soak_s=parse_duration(soak, "--soak") if soak else None,
                timeout_s=parse_duration(timeout_s, "--timeout") if timeout_s else None,
            )
            .checked()
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    say = log.info if as_json else click.echo
    with deploy.connect(fleet) as link:
        record = rollouts.start(fleet, link, ref, group, slot, settings)
        say(f"rollout of {ref} on {group} (slot {slot}): waves of {record.waves} device(s)")
        _finish(rollouts.Driver(fleet, link, record, say).run(), as_json)


@rollout.command("status")
@with_options(group_options)
def rollout_status(group: str | None, fleet_path: Path, as_json: bool) -> None:
    """Show a group's last rollout, from its retained record."""
    fleet = load_fleet(fleet_path)
    group = _group_of(fleet, group)
    with deploy.connect(fleet) as link:
        record = rollouts.read_record(link, fleet, group)
    if record is None:
        raise InputError(f"no rollout was started on group {group!r}")
    if as_json:
        click.echo(json.dumps(record.to_dict(), sort_keys=True))
        return
    reason = f" ({record.reason})" if record.reason else ""
    click.echo(
        f"rollout of {record.target} on {group} (slot {record.slot}): {record.state}{reason}, "
        f"{record.completed} of {len(record.waves)} wave(s) passed"
    )
    for device, touched in record.devices.items():
        click.echo(f"  {device_line(device, touched, record.state)}")


def device_line(device: str, touched: rollouts.Touched, state: str) -> str:
    """What became of one device in a rollout whose state is ``state``: a device with no
    outcome is waiting while the rollout runs, and was never heard from once it ended."""
    t = touched
    outcome = t.result or ("waiting" if state == rollouts.RUNNING else f"no outcome ({state})")
    p95 = f", p95 {t.p95_before} -> {t.p95_after} ms" if t.p95_after is not None else ""
    return f"{device}: wave {t.wave + 1}, seq {t.seq}, {outcome}{p95}"


def _act_on_running(
    fleet_path: Path, group: str | None, as_json: bool, act: Any
) -> rollouts.Record:
    """``act(fleet, link, record, say)`` on the group's running rollout; its result."""
    fleet = load_fleet(fleet_path)
    group = _group_of(fleet, group)
    with deploy.connect(fleet) as link:
        record = rollouts.running(link, fleet, group)
        return act(fleet, link, record, log.info if as_json else click.echo)


@rollout.command("resume")
@with_options(group_options)
def rollout_resume(group: str | None, fleet_path: Path, as_json: bool) -> None:
    """Continue an interrupted rollout where its record says it stopped."""

    def drive(fleet, link, record, say):
        return rollouts.Driver(fleet, link, record, say).run()

    _finish(_act_on_running(fleet_path, group, as_json, drive), as_json)


@rollout.command("abort")
@with_options(group_options)
def rollout_abort(group: str | None, fleet_path: Path, as_json: bool) -> None:
    """Stop a running rollout; every device it touched gets its previous deployment."""

    def stop(fleet, link, record, say):
        return rollouts.abort(fleet, link, record, "aborted by the operator", say)

    record = _act_on_running(fleet_path, group, as_json, stop)
    if as_json:
        click.echo(json.dumps(record.to_dict(), sort_keys=True))
