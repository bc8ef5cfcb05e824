"""Building, checking and publishing signed schema-2 desired states (one per device).

Every change goes through :func:`issue`: read each device's retained desired state and
state, verify the former with the fleet's public key (an unverifiable one is ignored,
with a warning, and never trusted for its seq), refuse when this host's clock is behind
the last ``issued`` found, check every named version is published and verifies, then
sign ``seq`` = last seq + 1 (the device's reported replay floor counts too) and
``expires`` = now + fleet.yaml ``desired_ttl_s``. What devices made of it is
:mod:`slimfleet.host.fleet.outcomes`' business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from slimfleet.agent.deployment import (
    SLOT_MAIN,
    Deployment,
    DesiredState,
    SlotSpec,
    deployment_from_dict,
    deployment_to_dict,
)
from slimfleet.agent.errors import InputError, SlimfleetError, VerifyError
from slimfleet.agent.wire import MAX_SAFE_INT, Manifest, ModelRef, parse_json
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.outcomes import read_states
from slimfleet.host.fleet.reports import OUTCOME_REFUSED, OUTCOME_SERVING, DeviceState

log = logging.getLogger(__name__)

# Agents drop a desired-state message over 64 KiB unread (their per-topic limit); a real
# one is a few KiB (32 slots x 8 tiers at most), so only huge URLs or names reach this.
MAX_DESIRED_BYTES = 64 * 1024
FLOOR_LEAD = 1_000_000
"""How far past the last signed seq a device's (unsigned) reported floor is followed."""


class BrokerUnreachable(SlimfleetError):
    """The broker cannot be reached: the operation failed (exit 1, as every command)."""


@contextmanager
def connect(fleet: FleetConfig) -> Iterator[BrokerLink]:
    """A connected link to the fleet's broker; failing to connect is BrokerUnreachable."""
    link = BrokerLink(fleet.broker)
    try:
        link.connect()
    except SlimfleetError as exc:
        raise BrokerUnreachable(str(exc)) from None
    try:
        yield link
    finally:
        link.close()


@dataclass(frozen=True)
class Current:
    """What the broker holds for one device: its verified desired state and its state."""

    device: str
    desired: DesiredState | None
    state: DeviceState | None

    @property
    def deployment(self) -> Deployment:
        return dict(self.desired.deployment) if self.desired else {}

    @property
    def running(self) -> Deployment:
        """What the device serves, i.e. what a rollback should bring it back to: its
        desired deployment (gates and remotes included) when its state reports serving
        that seq, else the deployment its state reports (models only); with no state,
        the desired one."""
        state, desired = self.state, self.desired
        if state is None:
            return self.deployment
        report = state.outcome_for(desired.seq) if desired is not None else None
        if report is not None and report.outcome == OUTCOME_SERVING:
            return self.deployment
        return {slot: SlotSpec(refs) for slot, refs in state.deployment.items() if refs}

    @property
    def next_seq(self) -> int:
        """One above the retained desired state's seq and the floor the device reports.
        The report is not signed: a floor beyond the last signed seq by more than
        :data:`FLOOR_LEAD` is taken only that far (a forged floor once made the host
        sign a seq of 4300 digits and then fail on every later one)."""
        last = self.desired.seq if self.desired else 0
        floor = self.state.floor if self.state else 0
        if self.desired is not None and floor > last + FLOOR_LEAD:
            log.warning(
                "%s reports floor %d, %d beyond the last seq signed for it (%d): taken as %d",
                self.device,
                floor,
                floor - last,
                last,
                last + FLOOR_LEAD,
            )
            floor = last + FLOOR_LEAD
        if max(last, floor) >= MAX_SAFE_INT:
            raise SlimfleetError(
                f"{self.device}: its seq would pass {MAX_SAFE_INT}; wipe its store and "
                "enrol it again"
            )
        return max(last, floor) + 1


def read_current(link: BrokerLink, fleet: FleetConfig, devices: list[str]) -> dict[str, Current]:
    """Each device's retained desired state (signature-checked) and reported state."""
    topics = {fleet.topics.device(d, "desired"): d for d in devices}
    payloads = link.read_retained(list(topics)) if topics else {}
    verifier = fleet.verifier()
    desired: dict[str, DesiredState] = {}
    for topic, payload in payloads.items():
        try:
            state = DesiredState.from_dict(verifier.verify(payload, topic))
        except VerifyError as exc:
            log.warning("ignoring the retained desired state of %s: %s", topics[topic], exc)
            continue
        if state.device == topics[topic]:
            desired[state.device] = state
        else:
            log.warning("ignoring %s: it is addressed to %r", topic, state.device)
    states = read_states(link, fleet.topics, devices)
    return {d: Current(d, desired.get(d), states.get(d)) for d in devices}


def check_clock(currents: Iterable[Current], now: float) -> None:
    """Refuse to sign when this host's clock is behind a desired state already issued
    (its expiry would be early, its issued time out of order). A desired state the device
    refused as issued in its future (stage ``skew``) does not count: it came from a host
    whose clock was ahead, and moved nothing on the device."""
    for current in currents:
        desired = current.desired
        if desired is None or now >= desired.issued:
            continue
        report = current.state.outcome_for(desired.seq) if current.state else None
        if report is not None and (report.outcome, report.stage) == (OUTCOME_REFUSED, "skew"):
            log.warning(
                "%s refused seq %d as issued in its future: not holding this host to it",
                current.device,
                desired.seq,
            )
            continue
        raise SlimfleetError(
            f"this host's clock is {desired.issued - now:.0f}s behind the desired state last "
            f"issued to {current.device} (seq {desired.seq}): fix the clock before signing"
        )


def check_published(
    link: BrokerLink,
    fleet: FleetConfig,
    refs: Iterable[ModelRef],
    *,
    allow_expired: bool = False,
) -> None:
    """Every ref must be published with a manifest the fleet's key verifies; InputError
    (exit 2) naming the first that is not. An expired one passes only with ``allow_expired``."""
    refs = sorted(set(refs))
    topics = {fleet.topics.manifest(r.name, r.version): r for r in refs}
    payloads = link.read_retained(list(topics)) if topics else {}
    verifier = fleet.verifier()
    for topic, ref in topics.items():
        if topic not in payloads:
            raise InputError(
                f"{ref} is not published on {fleet.broker.url} under {fleet.prefix}: "
                "run 'slimfleet publish' first"
            )
        try:
            manifest = Manifest.from_dict(verifier.verify(payloads[topic], topic))
            if (manifest.name, manifest.version) != (ref.name, ref.version):
                raise VerifyError(f"it describes {manifest.name}@{manifest.version}")
        except VerifyError as exc:
            raise InputError(f"the published manifest of {ref} does not verify: {exc}") from None
        if manifest.expired():
            if not allow_expired:
                raise InputError(f"{ref} has expired: publish a new version")
            log.warning("%s has expired: only devices that still hold it can use it", ref)


Plan = Callable[[Current], Deployment | None]
"""What a device should run next, given what it runs now; None leaves it alone."""


def issue(
    fleet: FleetConfig,
    link: BrokerLink,
    targets: list[str],
    plan: Plan,
    *,
    rollback: bool | None = False,
    allow_expired: bool | None = None,
    now: float | None = None,
) -> list[DesiredState]:
    """Sign and publish (retained, QoS 1) the desired state ``plan`` gives each target.

    ``rollback=None`` keeps each device's current rollback flag (re-issuing). Nothing is
    published unless every check passes for every device.
    """
    currents = read_current(link, fleet, targets)
    now = time.time() if now is None else now
    check_clock(currents.values(), now)
    plans = {d: plan(c) for d, c in currents.items()}
    plans = {d: p for d, p in plans.items() if p is not None}
    for device, deployment in plans.items():  # the contract's limits (slots, tiers, urls)
        try:
            deployment_from_dict(deployment_to_dict(deployment), f"{device}'s deployment")
        except VerifyError as exc:
            raise InputError(str(exc)) from None
    refs = [ref for p in plans.values() for spec in p.values() for ref in spec.models]
    expired_ok = bool(rollback) if allow_expired is None else allow_expired
    check_published(link, fleet, refs, allow_expired=expired_ok)
    signer = fleet.signer()
    issued, messages = [], []
    for device, deployment in plans.items():
        current = currents[device]
        flag = (
            rollback if rollback is not None else bool(current.desired and current.desired.rollback)
        )
        desired = DesiredState(
            device=device,
            deployment=deployment,
            key_id=signer.key_id,
            seq=current.next_seq,
            issued=now,
            expires=now + fleet.desired_ttl_s,
            rollback=flag,
        )
        envelope = signer.sign(desired.to_dict())
        if len(envelope) > MAX_DESIRED_BYTES:
            raise InputError(
                f"the desired state of {device} would be {len(envelope)} bytes, over the "
                f"{MAX_DESIRED_BYTES} devices accept: shorten remote URLs or gate names"
            )
        issued.append(desired)
        messages.append((fleet.topics.device(device, "desired"), envelope))
    link.publish_all(messages)
    return issued


# -- the changes the commands make -------------------------------------------------------


def main_slot(ref: ModelRef) -> Deployment:
    """``assign NAME@VERSION``: the model alone in slot ``main``."""
    return {SLOT_MAIN: SlotSpec((ref,))}


def assign_main(
    fleet: FleetConfig, ref: ModelRef, targets: list[str], *, rollback: bool = False
) -> list[DesiredState]:
    """Connect, set slot ``main`` of each target to ``ref`` and return without waiting
    (for library callers such as the demo)."""
    with connect(fleet) as link:
        return assign(fleet, link, main_slot(ref), targets, rollback=rollback)


def assign(
    fleet: FleetConfig,
    link: BrokerLink,
    slots: Deployment,
    targets: list[str],
    *,
    replace: bool = False,
    rollback: bool = False,
) -> list[DesiredState]:
    """Set ``slots`` on each target, merged into its current deployment (or replacing
    it with ``replace``)."""
    if not slots:
        raise InputError("nothing to assign: name a model, a --slot or a --deployment")
    return issue(
        fleet,
        link,
        targets,
        lambda current: dict(slots) if replace else current.deployment | slots,
        rollback=rollback,
    )


def unassign(
    fleet: FleetConfig, link: BrokerLink, targets: list[str], *, previous: bool = False
) -> list[DesiredState]:
    """Targets go back to nothing, or (``previous``) to the deployment their state reports
    as ``previous`` (models only: a previous gate or remote is not known to the host)."""
    if not previous:
        return issue(fleet, link, targets, lambda current: {})

    def back(current: Current) -> Deployment:
        if current.state is None or current.state.previous is None:
            raise InputError(f"{current.device} reports no previous deployment to go back to")
        previous = current.state.previous.items()
        return {slot: SlotSpec(tuple(refs)) for slot, refs in previous if refs}

    return issue(fleet, link, targets, back, rollback=True)


def reissue(fleet: FleetConfig, link: BrokerLink, targets: list[str]) -> list[DesiredState]:
    """Re-sign each target's current desired state: same deployment and rollback flag,
    seq + 1, a new expiry. Devices with no verifiable desired state are skipped."""

    def same(current: Current) -> Deployment | None:
        if current.desired is None:
            log.warning("%s has no desired state to re-issue", current.device)
            return None
        return current.deployment

    return issue(fleet, link, targets, same, rollback=None, allow_expired=True)


def restore(
    fleet: FleetConfig, link: BrokerLink, deployments: dict[str, Deployment]
) -> list[DesiredState]:
    """Signed rollbacks: each device in ``deployments`` goes back to the one given."""
    return issue(fleet, link, list(deployments), lambda c: deployments.get(c.device), rollback=True)


def runs(current: Current, ref: ModelRef) -> bool:
    """Whether the device's desired state or reported deployment names ``ref``."""
    named = [r for spec in current.deployment.values() for r in spec.models]
    if current.state is not None:
        named += [r for refs in current.state.deployment.values() for r in refs]
    return ref in named


def prune(fleet: FleetConfig, link: BrokerLink, ref: ModelRef, *, force: bool = False) -> int:
    """Clear ref's retained manifest, then its chunks; return how many topics were cleared.

    Refused (InputError) while a declared device's desired state or reported deployment
    names it, unless ``force``.
    """
    topic = fleet.topics.manifest(ref.name, ref.version)
    payload = link.read_retained([topic]).get(topic)
    if payload is None:
        raise InputError(f"{ref} is not published on {fleet.broker.url} under {fleet.prefix}")
    users = [d for d, c in read_current(link, fleet, list(fleet.devices)).items() if runs(c, ref)]
    if users and not force:
        raise InputError(
            f"{ref} is still used by {', '.join(users)}: assign something else first "
            "or prune with --force"
        )
    envelope = parse_json(payload, topic)
    signed = envelope.get("signed") if isinstance(envelope, dict) else None
    try:
        count = Manifest.from_dict(signed).chunk_count
    except VerifyError as exc:
        raise VerifyError(f"{topic}: cannot tell how many chunks to clear: {exc}") from None
    chunks = [fleet.topics.chunk(ref.name, ref.version, i) for i in range(count)]
    messages = [(t, b"") for t in [topic, *chunks]]  # manifest first: it vouches for chunks
    link.publish_all(messages, confirm=False)
    left = link.read_retained([topic, *chunks])
    if left:
        raise SlimfleetError(
            f"{fleet.broker.url} still serves {len(left)} retained message(s) of {ref} "
            "(an ACL denying this client?)"
        )
    return len(messages)
