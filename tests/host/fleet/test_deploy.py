"""Signed schema-2 desired states against a real mosquitto: seq, expiry, clock, checks,
slots merged into the current deployment, unassign, reissue, prune."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import models
import pytest
from devicesim import DeviceSimulator
from reportdocs import state_doc

from slimfleet.agent.deployment import SLOT_MAIN, DesiredState, Gate, RemoteTier, SlotSpec
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.signing import Signer, load_private_key
from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.outcomes import wait_for_outcomes
from slimfleet.host.fleet.publish import publish_model

A1, A2, B1 = ModelRef("a", 1), ModelRef("a", 2), ModelRef("b", 1)


@pytest.fixture
def published(fleet: FleetConfig, tmp_path: Path) -> FleetConfig:
    """The fleet with a@1, a@2 and b@1 published."""
    publish_model(fleet, models.save(models.add_one(), tmp_path / "a1.onnx"), "a", 1)
    publish_model(fleet, models.save(models.add_const(2.0), tmp_path / "a2.onnx"), "a", 2)
    publish_model(fleet, models.save(models.add_const(3.0), tmp_path / "b1.onnx"), "b", 1)
    return fleet


@pytest.fixture
def link(fleet: FleetConfig):
    with deploy.connect(fleet) as link:
        yield link


def retained_desired(link: BrokerLink, fleet: FleetConfig, device: str) -> DesiredState | None:
    return deploy.read_current(link, fleet, [device])[device].desired


def test_assign_signs_seq_and_expiry_and_merges_slots(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = replace(published, desired_ttl_s=3600.0)
    before = time.time()
    [first] = deploy.assign(fleet, link, deploy.main_slot(A1), ["cam-01"])
    assert (first.seq, first.device, first.rollback) == (1, "cam-01", False)
    assert before <= first.issued <= time.time()
    assert first.expires == pytest.approx(first.issued + 3600.0)
    assert retained_desired(link, fleet, "cam-01") == first

    # --slot merges into what the device has: main stays, det is added
    [second] = deploy.assign(fleet, link, {"det": SlotSpec((B1,))}, ["cam-01"])
    assert second.seq == 2
    assert second.deployment == {SLOT_MAIN: SlotSpec((A1,)), "det": SlotSpec((B1,))}
    # a deployment file replaces the whole deployment
    chain = {"rec": SlotSpec((A2, A1), Gate("max_prob", 0.8), RemoteTier("http://x/infer", 1.0))}
    [third] = deploy.assign(fleet, link, chain, ["cam-01"], replace=True)
    assert (third.seq, third.deployment) == (3, chain)
    assert retained_desired(link, fleet, "cam-01") == third


def test_seq_continues_from_the_reported_floor_and_ignores_a_forged_desired_state(
    published: FleetConfig, link: BrokerLink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = published
    with DeviceSimulator(fleet, ["cam-01"]) as sim:
        sim.publish_state("cam-01", state_doc("cam-01", desired={"seq": 41}))
        # a desired state signed by a key the fleet does not trust, claiming seq 1000
        generate_keys(tmp_path / "evil.key", tmp_path / "evil.pub")
        evil = Signer(load_private_key(tmp_path / "evil.key"))
        forged = DesiredState("cam-01", {}, evil.key_id, 1000, time.time(), time.time() + 60)
        link.publish_all([(fleet.topics.device("cam-01", "desired"), evil.sign(forged.to_dict()))])
        caplog.set_level(logging.WARNING, logger="slimfleet.host.fleet.deploy")
        [sent] = deploy.assign(fleet, link, deploy.main_slot(A1), ["cam-01"])
        assert sent.seq == 42
        assert "ignoring the retained desired state of cam-01" in caplog.text
        [outcome] = wait_for_outcomes(link, fleet.topics, {"cam-01": 42}, 10)
        assert outcome.ok, outcome


def test_refuses_to_sign_when_the_host_clock_is_behind_the_last_issued(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = published
    ahead = time.time() + 3600
    deploy.issue(fleet, link, ["cam-02"], lambda c: deploy.main_slot(A1), now=ahead)
    with pytest.raises(SlimfleetError, match=r"clock is 3[56]\d\ds behind .* cam-02 \(seq 1\)"):
        deploy.assign(fleet, link, deploy.main_slot(A2), ["cam-02", "cam-01"])
    assert retained_desired(link, fleet, "cam-02").deployment == deploy.main_slot(A1)
    assert retained_desired(link, fleet, "cam-01") is None  # nothing was sent to anyone


def test_a_desired_state_a_device_refused_as_future_dated_does_not_hold_the_host(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = published

    def decide(device, desired):
        if desired.issued > time.time() + 60:
            return "refused", "skew", "issued 3600 s in this device's future"
        return "serving", None, None

    with DeviceSimulator(fleet, ["cam-02"], decide):
        [ahead] = deploy.issue(
            fleet, link, ["cam-02"], lambda c: deploy.main_slot(A1), now=time.time() + 3600
        )
        [refused] = wait_for_outcomes(link, fleet.topics, {"cam-02": ahead.seq}, 10)
        assert (refused.outcome, refused.stage) == ("refused", "skew")
        [sent] = deploy.assign(fleet, link, deploy.main_slot(A2), ["cam-02"])
        assert sent.seq == 2
        assert wait_for_outcomes(link, fleet.topics, {"cam-02": 2}, 10)[0].ok


def test_every_version_must_be_published_and_verify(
    published: FleetConfig, link: BrokerLink, tmp_path: Path
) -> None:
    fleet = published
    slots = {SLOT_MAIN: SlotSpec((A1,)), "det": SlotSpec((ModelRef("b", 7),))}
    with pytest.raises(InputError, match=r"^b@7 is not published on mqtt://.*slimfleet publish"):
        deploy.assign(fleet, link, slots, ["cam-01", "cam-02"])
    assert retained_desired(link, fleet, "cam-01") is None

    generate_keys(tmp_path / "new" / "k", tmp_path / "new" / "k.pub")
    rekeyed = replace(fleet, private_key=tmp_path / "new/k", public_key=tmp_path / "new/k.pub")
    with pytest.raises(
        InputError, match="manifest of a@1 does not verify: .*signed by unknown key"
    ):
        deploy.assign(rekeyed, link, deploy.main_slot(A1), ["cam-01"])


def test_an_expired_version_only_as_a_rollback(fleet: FleetConfig, tmp_path: Path) -> None:
    publish_model(fleet, models.save(models.add_one(), tmp_path / "a.onnx"), "a", 1, ttl_s=0.2)
    time.sleep(0.3)
    with deploy.connect(fleet) as link:
        with pytest.raises(InputError, match="a@1 has expired"):
            deploy.assign(fleet, link, deploy.main_slot(A1), ["cam-01"])
        [sent] = deploy.assign(fleet, link, deploy.main_slot(A1), ["cam-01"], rollback=True)
    assert sent.rollback


def test_unassign_to_nothing_or_to_the_previous_deployment(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = published
    with DeviceSimulator(fleet, ["cam-01", "cam-02"]) as sim:
        deploy.assign(fleet, link, deploy.main_slot(A1), ["cam-01", "cam-02"])
        deploy.assign(fleet, link, deploy.main_slot(A2), ["cam-01"])
        wait_for_outcomes(link, fleet.topics, {"cam-01": 2, "cam-02": 1}, 10)
        [back] = deploy.unassign(fleet, link, ["cam-01"], previous=True)
        assert back.deployment == deploy.main_slot(A1) and back.rollback and back.seq == 3
        [empty] = deploy.unassign(fleet, link, ["cam-02"])
        assert (empty.deployment, empty.seq) == ({}, 2)
        outcomes = wait_for_outcomes(link, fleet.topics, {"cam-01": 3, "cam-02": 2}, 10)
        assert all(o.ok for o in outcomes), outcomes
        assert sim.state["cam-02"]["deployment"] == {}
    with pytest.raises(InputError, match="gate-01 reports no previous deployment"):
        deploy.unassign(fleet, link, ["gate-01"], previous=True)


def test_reissue_keeps_the_deployment_with_a_new_seq_and_expiry(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = published
    [old] = deploy.assign(fleet, link, deploy.main_slot(A1), ["cam-01"], rollback=True)
    time.sleep(0.01)
    issued = deploy.reissue(fleet, link, ["cam-01", "cam-02"])  # cam-02 has nothing
    assert [d.device for d in issued] == ["cam-01"]
    [new] = issued
    assert (new.deployment, new.rollback, new.seq) == (old.deployment, True, old.seq + 1)
    assert new.expires > old.expires
    assert retained_desired(link, fleet, "cam-01") == new


def test_prune_refuses_while_a_device_uses_the_version(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = published
    deploy.assign(fleet, link, deploy.main_slot(A1), ["cam-01"])
    with pytest.raises(InputError, match=r"a@1 is still used by cam-01: .* --force"):
        deploy.prune(fleet, link, A1)
    assert deploy.prune(fleet, link, A2) > 1  # manifest and its chunks
    manifest = fleet.topics.manifest("a", 2)
    assert link.read_retained([manifest, fleet.topics.chunk("a", 2, 0)]) == {}
    with pytest.raises(InputError, match="a@2 is not published"):
        deploy.prune(fleet, link, A2)
    deploy.prune(fleet, link, A1, force=True)
    assert link.read_retained([fleet.topics.manifest("a", 1)]) == {}


def test_what_a_device_runs_comes_from_its_state_unless_it_serves_its_desired_state(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = published
    gated = {SLOT_MAIN: SlotSpec((A2, A1), Gate("max_prob", 0.5))}

    def decide(device, desired):
        if device == "cam-02":
            return "refused", "smoke_test", "outputs differ"
        return "serving", None, None

    with DeviceSimulator(fleet, ["cam-01", "cam-02"], decide) as sim:
        sim.publish_state("cam-02", state_doc("cam-02"))  # serving ocr@3 in slot main
        current = deploy.read_current(link, fleet, ["cam-01", "cam-02", "gate-01"])
        assert current["cam-02"].desired is None and current["cam-02"].deployment == {}
        assert current["cam-02"].running == deploy.main_slot(ModelRef("ocr", 3))
        assert current["gate-01"].running == {} and current["gate-01"].next_seq == 1

        sent = deploy.assign(fleet, link, gated, ["cam-01", "cam-02"])
        wait_for_outcomes(link, fleet.topics, {d.device: d.seq for d in sent}, 10)
        current = deploy.read_current(link, fleet, ["cam-01", "cam-02"])
    assert current["cam-01"].running == gated  # serves it: the full spec, gate included
    assert current["cam-02"].deployment == gated  # refused it: still on ocr@3
    assert current["cam-02"].running == deploy.main_slot(ModelRef("ocr", 3))


def test_a_merged_deployment_must_stay_within_the_contract(
    published: FleetConfig, link: BrokerLink
) -> None:
    fleet = published
    slots = {f"s{i}": SlotSpec((A1,)) for i in range(20)}
    deploy.assign(fleet, link, slots, ["cam-01"])
    more = {f"t{i}": SlotSpec((A2,)) for i in range(20)}
    with pytest.raises(InputError, match="cam-01's deployment: expected an object of at most 32"):
        deploy.assign(fleet, link, more, ["cam-01"])
    with pytest.raises(InputError, match=r"cam-01's deployment.main.remote.url: expected an http"):
        deploy.assign(
            fleet, link, {SLOT_MAIN: SlotSpec((A1,), None, RemoteTier("file:///x"))}, ["cam-01"]
        )
    assert len(retained_desired(link, fleet, "cam-01").deployment) == 20


def test_a_desired_state_over_the_devices_limit_is_refused(
    published: FleetConfig, link: BrokerLink
) -> None:
    remote = RemoteTier("https://x.example/" + "a" * 70_000)
    with pytest.raises(InputError, match=r"desired state of cam-01 would be \d+ bytes, over"):
        deploy.assign(published, link, {SLOT_MAIN: SlotSpec((A1,), None, remote)}, ["cam-01"])
    assert retained_desired(link, published, "cam-01") is None


def test_a_forged_floor_is_followed_only_a_bounded_way_past_the_last_signed_seq(caplog) -> None:
    """A device's state is not signed: a floor of 10**4300 once made the host sign a seq
    of that size, then fail on every later assign (exit 70)."""
    from slimfleet.agent.wire import MAX_SAFE_INT
    from slimfleet.host.fleet.reports import parse_state

    signed = DesiredState(
        device="cam-01",
        deployment=deploy.main_slot(A1),
        key_id="k",
        seq=5,
        issued=time.time(),
        expires=time.time() + 60,
    )
    forged = parse_state({**state_doc("cam-01"), "floor": 10**12}, "cam-01")
    current = deploy.Current("cam-01", signed, forged)
    assert current.next_seq == 5 + deploy.FLOOR_LEAD + 1
    assert "reports floor 1000000000000" in caplog.text
    honest = parse_state({**state_doc("cam-01"), "floor": 9}, "cam-01")
    assert deploy.Current("cam-01", signed, honest).next_seq == 10
    worn_out = replace(signed, seq=MAX_SAFE_INT)
    with pytest.raises(SlimfleetError, match="its seq would pass"):
        deploy.Current("cam-01", worn_out, honest).next_seq  # noqa: B018
