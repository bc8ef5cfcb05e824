"""Staged rollouts on a real mosquitto with simulated devices: waves that pass, an abort on
a refused version and on a p95 regression (every touched device rolled back), the
signed retained record, resume and abort of an interrupted rollout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import models
import pytest
from devicesim import DeviceSimulator

from slimfleet.agent.deployment import SLOT_MAIN
from slimfleet.agent.errors import InputError
from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet import rollout as rollouts
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.outcomes import wait_for_outcomes
from slimfleet.host.fleet.publish import publish_model
from slimfleet.host.fleet.rollout_policy import RolloutSettings

A1, A2 = ModelRef("a", 1), ModelRef("a", 2)
FAST = RolloutSettings(waves="1,100%", soak_s=0.6, timeout_s=5.0, max_p95_regression=0.5)


@pytest.fixture
def on_a1(fleet: FleetConfig, tmp_path: Path) -> FleetConfig:
    """a@1 and a@2 published; a@1 assigned (not yet applied) to the whole group 'all'."""
    publish_model(fleet, models.save(models.add_one(), tmp_path / "a1.onnx"), "a", 1)
    publish_model(fleet, models.save(models.add_const(2.0), tmp_path / "a2.onnx"), "a", 2)
    return fleet


def p95_by_version(slow: float) -> object:
    return lambda device, deployment: slow if deployment[SLOT_MAIN][0]["version"] == 2 else 10.0


def baseline(fleet: FleetConfig, link) -> None:
    sent = deploy.assign(fleet, link, deploy.main_slot(A1), fleet.groups["all"])
    assert all(o.ok for o in wait_for_outcomes(link, fleet.topics, {d.device: d.seq for d in sent}))


def main_of(sim: DeviceSimulator) -> dict[str, str]:
    with sim.lock:
        return {
            d: "{name}@{version}".format(**s["deployment"]["main"][0]) for d, s in sim.state.items()
        }


def roll_a2(fleet: FleetConfig, **simulate: Any) -> tuple[rollouts.Record, dict, list[str]]:
    """Every device of 'all' on a@1, then a rollout of a@2: the record as the driver
    left it, what each simulated device runs after, and the lines the driver said."""
    lines: list[str] = []
    with (
        deploy.connect(fleet) as link,
        DeviceSimulator(fleet, fleet.groups["all"], **simulate) as sim,
    ):
        baseline(fleet, link)
        record = rollouts.start(fleet, link, A2, "all", SLOT_MAIN, FAST)
        assert record.waves == [1, 3]
        record = rollouts.Driver(fleet, link, record, lines.append).run()
        assert rollouts.read_record(link, fleet, "all") == record
        return record, main_of(sim), lines


def test_a_healthy_rollout_goes_through_every_wave(on_a1: FleetConfig) -> None:
    fleet = on_a1
    stored, running, lines = roll_a2(fleet, p95_ms=p95_by_version(11.0))
    assert running == dict.fromkeys(fleet.groups["all"], "a@2")
    assert stored.state == rollouts.DONE
    assert stored.completed == 2
    assert {d: t.result for d, t in stored.devices.items()} == dict.fromkeys(running, "serving")
    assert stored.devices["cam-01"].p95_before == 10.0
    assert stored.devices["cam-01"].p95_after == 11.0
    assert lines[0] == "wave 1/2: 1 device(s), 1 serving, p95 +10%: healthy"
    assert lines[-1] == "rollout of a@2 on all: done"


def test_a_refusal_aborts_and_every_touched_device_goes_back(on_a1: FleetConfig) -> None:
    fleet = on_a1

    def decide(device, desired):
        if device == "cam-02" and A2 in desired.refs():
            return "refused", "smoke_test", "outputs differ"
        return "serving", None, None

    record, running, lines = roll_a2(fleet, decide=decide)
    assert running == dict.fromkeys(fleet.groups["all"], "a@1")
    with deploy.connect(fleet) as link:
        desired = deploy.read_current(link, fleet, ["cam-01"])["cam-01"].desired
    assert record.state == rollouts.ABORTED
    assert record.reason == "1 of 3 devices failed (33% > 0%): cam-02"
    assert desired.rollback and desired.deployment == deploy.main_slot(A1)
    assert lines[-1] == (
        "rollout of a@2 on all: aborted (1 of 3 devices failed (33% > 0%): cam-02); "
        "3 of 3 device(s) confirmed back on their previous deployment"
    )


def test_a_p95_regression_aborts_the_first_wave(on_a1: FleetConfig) -> None:
    fleet, lines = on_a1, []
    with (
        deploy.connect(fleet) as link,
        DeviceSimulator(fleet, fleet.groups["all"], p95_ms=p95_by_version(40.0)) as sim,
    ):
        baseline(fleet, link)
        record = rollouts.start(fleet, link, A2, "all", SLOT_MAIN, FAST)
        record = rollouts.Driver(fleet, link, record, lines.append).run()
        assert main_of(sim) == dict.fromkeys(fleet.groups["all"], "a@1")
    assert record.state == rollouts.ABORTED
    assert record.reason == "p95 latency regressed +300% (limit +50%)"
    assert list(record.devices) == ["cam-01"]  # the second wave never started


def test_an_interrupted_rollout_resumes_or_aborts(on_a1: FleetConfig) -> None:
    fleet = on_a1
    with deploy.connect(fleet) as link, DeviceSimulator(fleet, fleet.groups["all"]) as sim:
        baseline(fleet, link)
        rollouts.start(fleet, link, A2, "all", SLOT_MAIN, FAST)
        with pytest.raises(InputError, match="a rollout of a@2 on all is still running"):
            rollouts.start(fleet, link, A2, "all", SLOT_MAIN, FAST)
        record = rollouts.running(link, fleet, "all")  # as 'resume' reads it back
        assert rollouts.Driver(fleet, link, record, lambda line: None).run().state == "done"
        assert main_of(sim) == dict.fromkeys(fleet.groups["all"], "a@2")
        with pytest.raises(InputError, match=r"no rollout is running on group 'all' \(its last"):
            rollouts.running(link, fleet, "all")

        record = rollouts.start(fleet, link, A1, "all", SLOT_MAIN, FAST)
        record = rollouts.abort(fleet, link, record, "by hand", lambda line: None)
        assert rollouts.read_record(link, fleet, "all").state == rollouts.ABORTED
        with pytest.raises(InputError, match="unknown group 'nope'"):
            rollouts.running(link, fleet, "nope")
