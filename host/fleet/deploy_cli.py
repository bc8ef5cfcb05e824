"""``slimfleet assign | unassign | reissue | prune``: change what devices run, then say
what became of it (``rollout`` is in :mod:`slimfleet.host.fleet.rollout_cli`).

Exit codes: 0 every targeted device serves what it was sent (or ``--no-wait``), 1 a
device refused, went stale or did not answer within ``--timeout``, 2 bad input or an
unreachable broker.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click

from slimfleet.agent.deployment import Deployment, DesiredState, SlotSpec, check_slot
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet.cli import fleet_option, json_option
from slimfleet.host.fleet.config import FleetConfig, load_fleet
from slimfleet.host.fleet.deployfile import load_deployment
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.outcomes import DEFAULT_WAIT_S, Outcome, wait_for_outcomes
from slimfleet.host.units import parse_duration

log = logging.getLogger(__name__)


def parse_ref(text: str, what: str) -> ModelRef:
    try:
        return ModelRef.parse(text)
    except ValueError as exc:
        raise InputError(f"{what}: {exc}") from None


def parse_slot(text: str) -> tuple[str, ModelRef]:
    """``SLOT=NAME@VERSION``; InputError naming the option otherwise."""
    slot, sep, ref = text.partition("=")
    if not sep:
        raise InputError(f"--slot {text!r}: expected SLOT=NAME@VERSION, e.g. det=ocr-det@3")
    try:
        check_slot(slot)
    except ValueError as exc:
        raise InputError(f"--slot {text!r}: {exc}") from None
    return slot, parse_ref(ref, f"--slot {text!r}")


targets_options = [
    click.option("--device", "devices", multiple=True, help="A device id (repeatable)."),
    click.option(
        "--group", "groups", multiple=True, help="A group from the fleet file (repeatable)."
    ),
]
wait_options = [
    click.option(
        "--wait/--no-wait",
        default=True,
        show_default=True,
        help="Wait until every device serves or refuses what it was sent.",
    ),
    click.option(
        "--timeout",
        "timeout_s",
        default=f"{DEFAULT_WAIT_S:g}s",
        show_default=True,
        help="How long to wait for the devices' outcomes (e.g. 90s, 5m).",
    ),
]


def with_options(options: list[Any]) -> Any:
    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _slots(doc: Deployment) -> dict[str, list[str]]:
    return {slot: [str(r) for r in spec.models] for slot, spec in sorted(doc.items())}


def report(
    link: BrokerLink,
    fleet: FleetConfig,
    issued: list[DesiredState],
    *,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Wait for the outcomes (unless told not to), print one line per device, set the
    exit code: 0 when every device serves, 1 (and one line naming them) otherwise."""
    if not issued and not as_json:
        click.echo("no device had anything to change")
    if wait:
        outcomes = wait_for_outcomes(link, fleet.topics, {d.device: d.seq for d in issued}, timeout)
    else:
        outcomes = [Outcome(d.device, d.seq, "sent") for d in issued]
    by_device = {d.device: d for d in issued}
    failed = [o for o in outcomes if not o.ok] if wait else []
    if as_json:
        rows = [
            o.to_dict() | {"deployment": _slots(by_device[o.device].deployment)} for o in outcomes
        ]
        click.echo(json.dumps({"ok": not failed, "devices": rows}, sort_keys=True))
    else:
        for o in outcomes:
            slots = _slots(by_device[o.device].deployment)
            shown = " ".join(f"{s}={','.join(r)}" for s, r in slots.items()) or "nothing"
            text = o.line() if wait else f"{o.device}: sent"
            click.echo(f"{text}  [seq {o.seq}: {shown}]")
    if failed:
        shown = ", ".join(f"{o.device} {o.outcome}" for o in failed[:10])
        raise SlimfleetError(
            f"{len(failed)} of {len(outcomes)} device(s) do not serve what they were sent: "
            + shown
            + (" ..." if len(failed) > 10 else "")
        )


@click.command()
@click.argument("model", required=False, metavar="[NAME@VERSION]")
@click.option(
    "--slot", "slot_args", multiple=True, metavar="SLOT=NAME@VERSION", help="Set one slot."
)
@click.option(
    "--deployment",
    "deployment_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A deployment file: the device's whole deployment (slots, tiers, gates, remote).",
)
@with_options(targets_options)
@click.option("--rollback", is_flag=True, help="Allow devices to go back to older versions.")
@with_options(wait_options)
@fleet_option
@json_option
def assign(
    model: str | None,
    slot_args: tuple[str, ...],
    deployment_file: Path | None,
    devices: tuple[str, ...],
    groups: tuple[str, ...],
    rollback: bool,
    wait: bool,
    timeout_s: str,
    fleet_path: Path,
    as_json: bool,
) -> None:
    """Set what devices run: NAME@VERSION (slot 'main'), --slot SLOT=NAME@VERSION
    (merged into each device's current deployment), or --deployment FILE (replaces it).

    Every version must be published and verify. Waits for each device's outcome.
    """
    if deployment_file is not None and (model or slot_args):
        raise InputError("--deployment replaces the whole deployment: give no model or --slot")
    slots: Deployment = {}
    if model:
        slots |= deploy.main_slot(parse_ref(model, "NAME@VERSION"))
    for text in slot_args:
        slot, ref = parse_slot(text)
        if slot in slots:
            raise InputError(f"--slot {text!r}: slot {slot!r} is already set on this command line")
        slots[slot] = SlotSpec((ref,))
    if deployment_file is not None:
        slots = load_deployment(deployment_file)
    wait_s = parse_duration(timeout_s, "--timeout")
    fleet = load_fleet(fleet_path)
    targets = fleet.resolve(devices, groups)
    with deploy.connect(fleet) as link:
        issued = deploy.assign(
            fleet, link, slots, targets, replace=deployment_file is not None, rollback=rollback
        )
        report(link, fleet, issued, wait=wait, timeout=wait_s, as_json=as_json)


@click.command()
@with_options(targets_options)
@click.option(
    "--previous", is_flag=True, help="Go back to the previous deployment instead of nothing."
)
@with_options(wait_options)
@fleet_option
@json_option
def unassign(
    devices: tuple[str, ...],
    groups: tuple[str, ...],
    previous: bool,
    wait: bool,
    timeout_s: str,
    fleet_path: Path,
    as_json: bool,
) -> None:
    """Devices stop serving (an empty deployment), or go back to their previous one."""
    wait_s = parse_duration(timeout_s, "--timeout")
    fleet = load_fleet(fleet_path)
    targets = fleet.resolve(devices, groups)
    with deploy.connect(fleet) as link:
        issued = deploy.unassign(fleet, link, targets, previous=previous)
        report(link, fleet, issued, wait=wait, timeout=wait_s, as_json=as_json)


@click.command()
@with_options(targets_options)
@click.option("--every", help="Re-issue in a loop at this interval (e.g. 1d) until interrupted.")
@click.option("--rounds", type=click.IntRange(min=1), hidden=True, help="Stop after N rounds.")
@with_options(wait_options)
@fleet_option
@json_option
def reissue(
    devices: tuple[str, ...],
    groups: tuple[str, ...],
    every: str | None,
    rounds: int | None,
    wait: bool,
    timeout_s: str,
    fleet_path: Path,
    as_json: bool,
) -> None:
    """Re-sign devices' current desired states (same deployment, seq + 1, new expiry)
    before they expire. Without --device/--group: every device in the fleet file."""
    wait_s = parse_duration(timeout_s, "--timeout")
    fleet = load_fleet(fleet_path)
    targets = fleet.resolve(devices, groups) if devices or groups else list(fleet.devices)
    if not targets:
        raise InputError(f"{fleet.path} declares no devices")
    if every is None:
        with deploy.connect(fleet) as link:
            issued = deploy.reissue(fleet, link, targets)
            report(link, fleet, issued, wait=wait, timeout=wait_s, as_json=as_json)
        return
    interval = parse_duration(every, "--every")
    if interval >= fleet.desired_ttl_s:
        raise InputError(
            f"--every {every} is not shorter than desired_ttl_s ({fleet.desired_ttl_s:g}s): "
            "desired states would expire between rounds"
        )
    reissue_loop(fleet, targets, interval, rounds, wait=wait, timeout_s=wait_s, as_json=as_json)


def reissue_loop(
    fleet: FleetConfig,
    targets: list[str],
    interval: float,
    rounds: int | None,
    *,
    wait: bool,
    timeout_s: float,
    as_json: bool = False,
) -> None:
    """One round per ``interval`` seconds, one line per round (a JSON object with
    ``as_json``); a failed round (broker down, ...) is reported on stderr and the next
    one tried. ``rounds`` bounds the loop (tests); otherwise it runs until interrupted."""
    done = 0
    while rounds is None or done < rounds:
        started = time.monotonic()
        done += 1
        try:
            with deploy.connect(fleet) as link:
                issued = deploy.reissue(fleet, link, targets)
                expected = {d.device: d.seq for d in issued}
                outcomes = (
                    wait_for_outcomes(link, fleet.topics, expected, timeout_s) if wait else []
                )
        except SlimfleetError as exc:
            click.echo(f"round {done}: error: {exc}", err=True)
        else:
            serving = sum(o.ok for o in outcomes)
            if as_json:
                rows = [o.to_dict() for o in outcomes] or [
                    {"device": d, "seq": seq} for d, seq in expected.items()
                ]
                click.echo(json.dumps({"round": done, "devices": rows}, sort_keys=True))
            else:
                shown = ", ".join(f"{d}@seq{seq}" for d, seq in expected.items()) or "nothing"
                tail = f"; {serving} of {len(issued)} serving" if wait else ""
                click.echo(f"round {done}: re-signed {len(issued)} desired state(s): {shown}{tail}")
        if rounds is not None and done >= rounds:
            break
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


@click.command()
@click.argument("model", metavar="NAME@VERSION")
@click.option("--force", is_flag=True, help="Prune even while devices still use it.")
@fleet_option
@json_option
def prune(model: str, force: bool, fleet_path: Path, as_json: bool) -> None:
    """Remove a published version's retained manifest and chunks from the broker.

    Refused while a device declared in the fleet file runs it or is assigned it.
    """
    ref = parse_ref(model, "NAME@VERSION")
    fleet = load_fleet(fleet_path)
    with deploy.connect(fleet) as link:
        cleared = deploy.prune(fleet, link, ref, force=force)
    doc = {"name": ref.name, "version": ref.version, "cleared": cleared}
    text = f"pruned {ref}: cleared {cleared} retained message(s) on {fleet.broker.url}"
    click.echo(json.dumps(doc, sort_keys=True) if as_json else text)
