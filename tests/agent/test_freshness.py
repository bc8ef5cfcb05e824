"""Freshness and integrity against a real mosquitto: replay, skew, expiry, corrupt or wiped
state files, and stored models edited at rest."""

from __future__ import annotations

import json
import shutil
import time

import models
import numpy as np
import pytest

from slimfleet.agent.deployment import DesiredState
from slimfleet.agent.desired import admit
from slimfleet.agent.wire import ModelRef

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def ref(name: str, version: int) -> dict:
    return {"name": name, "version": version}


def main(version: int) -> dict:
    return {"main": [ref("m", version)]}


def outcome(state: dict) -> tuple:
    desired = state["desired"] or {}
    return desired.get("seq"), desired.get("outcome")


def served_const(agent) -> float:
    return float((agent.infer({"x": X})["y"] - X)[0, 0])


@pytest.fixture
def started(mosquitto, rig, watcher):
    """A factory of started agents on the rig's store (stopped after the test)."""
    made = []

    def start(**extra):
        agent = rig.agent(mosquitto.url, **extra)
        agent.start()
        made.append(agent)
        return agent

    yield start
    for agent in made:
        agent.stop()


@pytest.fixture
def agent(started, rig, watcher):
    """An agent serving m@1 (+1) at seq 1, then m@2 (+2) at seq 2."""
    rig.publish(models.add_const(1.0), 1)
    rig.publish(models.add_const(2.0), 2)
    agent = started()
    watcher.wait("status", lambda s: s == "online")
    rig.assign(1)
    watcher.event("swap_ok", deployment=main(1))
    rig.assign(2)
    watcher.event("swap_ok", deployment=main(2))
    watcher.wait("state", lambda s: outcome(s) == (2, "serving"))
    return agent


# -- the policy, as a pure function -------------------------------------------------------


def _desired(seq: int, issued: float, ttl: float = 100.0, device: str = "d") -> DesiredState:
    return DesiredState(device, {}, "k", seq, issued, issued + ttl)


@pytest.mark.parametrize(
    ("desired", "stage"),
    [
        (_desired(6, 1000.0), None),
        (_desired(5, 1000.0), "replay"),
        (_desired(4, 1000.0), "replay"),
        (_desired(6, 1000.0, device="other"), "verify"),
        (_desired(6, 1000.0 + 301), "skew"),
        (_desired(6, 1000.0 + 299), None),
        (_desired(6, 199.0), "replay"),  # before the store was enrolled, beyond the skew
        (_desired(6, 201.0, ttl=1000.0), None),  # before the enrolment, within the skew
        (_desired(6, 800.0, ttl=150.0), "expired"),
    ],
    ids=[
        "fresh",
        "same-seq",
        "older-seq",
        "other-device",
        "skew",
        "within-skew",
        "pre-enrol",
        "pre-enrol-within-skew",
        "expired",
    ],
)
def test_admission_policy(desired, stage) -> None:
    refusal = admit(desired, device="d", floor=5, enrolled=500.0, now=1000.0, max_skew_s=300.0)
    assert (refusal.stage if refusal else None) == stage


# -- replay, skew and expiry over MQTT ----------------------------------------------------


def test_a_replayed_desired_state_is_refused_and_changes_nothing(agent, rig, watcher):
    old = rig.desired({"main": "m@1"}, seq=1, rollback=True)  # a captured old seq, re-signed
    rig.put_desired(old)
    refused = watcher.event("desired_refused", seq=1)
    assert refused["stage"] == "replay" and "not above the 2" in refused["reason"]
    assert served_const(agent) == 2.0
    assert agent.state_document()["desired"]["seq"] == 2 and agent.state.floor == 2


def test_a_desired_state_from_the_future_is_refused_without_moving_the_floor(agent, rig, watcher):
    rig.deploy({"main": "m@1"}, seq=50, issued=time.time() + 3600, rollback=True)
    refused = watcher.event("desired_refused", seq=50)
    assert refused["stage"] == "skew" and "future" in refused["reason"]
    state = watcher.wait("state", lambda s: outcome(s) == (50, "refused"))
    assert state["floor"] == 2 and state["deployment"] == main(2)
    assert served_const(agent) == 2.0
    rig.deploy({"main": "m@1"}, seq=3, rollback=True)  # the next honest one still works
    watcher.wait("state", lambda s: outcome(s) == (3, "serving"))
    assert served_const(agent) == 1.0 and agent.state.floor == 3


def test_the_allowed_clock_skew_is_configurable(started, rig, watcher):
    rig.publish(models.add_const(1.0), 1)
    agent = started(max_clock_skew_s=7200)
    watcher.wait("status", lambda s: s == "online")
    rig.deploy({"main": "m@1"}, issued=time.time() + 3600)
    watcher.wait("state", lambda s: outcome(s) == (1, "serving"))
    assert served_const(agent) == 1.0


def test_an_expired_desired_state_is_not_applied_and_reported_stale(agent, rig, watcher):
    expired = rig.desired({"main": "m@1"}, ttl_s=0.5, rollback=True)  # after the enrolment
    time.sleep(1.0)
    rig.put_desired(expired)
    stale = watcher.event("desired_stale", seq=3)
    assert stale["stage"] == "expired"
    state = watcher.wait("state", lambda s: outcome(s) == (3, "stale"))
    assert state["status"] == "stale" and state["floor"] == 2
    assert state["deployment"] == main(2) and served_const(agent) == 2.0


def test_a_served_desired_state_that_expires_becomes_stale_within_its_period(agent, rig, watcher):
    rig.deploy({"main": "m@1"}, ttl_s=3.0, rollback=True)  # seq 3, served then frozen
    watcher.wait("state", lambda s: outcome(s) == (3, "serving"))
    stale = watcher.event("desired_stale", seq=3, timeout=10)
    state = watcher.wait("state", lambda s: outcome(s) == (3, "stale"))
    assert stale["ts"] <= time.time() and state["status"] == "stale"
    assert served_const(agent) == 1.0  # it keeps serving
    rig.assign(2)  # a fresh one ends the freeze
    watcher.wait("state", lambda s: outcome(s) == (4, "serving") and s["status"] == "serving")


def test_a_desired_state_expiring_centuries_away_is_followed_and_so_is_the_next(
    agent, rig, watcher
):
    """A signed ttl beyond what one thread wait can hold (~292 years) once killed the
    control thread: the agent waits in steps instead."""
    rig.deploy({"main": "m@1"}, ttl_s=1e12, rollback=True)  # seq 3
    watcher.wait("state", lambda s: outcome(s) == (3, "serving"))
    rig.assign(2)
    watcher.wait("state", lambda s: outcome(s) == (4, "serving") and s["status"] == "serving")


# -- the floor survives corrupt or wiped files --------------------------------------------


@pytest.mark.parametrize("damaged", ["desired.json", "state.json"])
def test_the_floor_survives_a_corrupt_state_file(agent, started, rig, watcher, damaged):
    captured = rig.desired({"main": "m@1"}, seq=1, rollback=True)
    store = agent.store.root
    agent.stop()
    (store / damaged).write_bytes(b'{"envelope": "trunc')
    again = started()
    assert again.state.floor == 2  # at once, from the other file
    watcher.wait(
        "state",
        lambda s: s["started"] > agent.telemetry.started_at and outcome(s) == (2, "serving"),
    )
    assert served_const(again) == 2.0  # from the store, or re-applied from desired.json
    kept = json.loads((store / "state.json").read_text())["floor"]
    assert kept == json.loads((store / "desired.json").read_text())["floor"] == 2  # repaired
    rig.put_desired(captured)
    refused = watcher.event("desired_refused", seq=1)
    assert refused["stage"] == "replay"
    assert served_const(again) == 2.0


def test_a_wiped_store_refuses_desired_states_issued_before_its_enrolment(
    agent, started, rig, watcher
):
    # signed before the wipe, earlier than the clock-skew allowance (300 s) reaches back
    captured = rig.desired({"main": "m@1"}, seq=7, rollback=True, issued=time.time() - 600)
    store = agent.store.root
    agent.stop()
    shutil.rmtree(store)
    # the broker now retains the captured state (an attacker re-published it), not the
    # honest one issued seconds ago, which the clock-skew allowance would still accept
    rig.put_desired(captured)
    time.sleep(0.01)
    again = started()
    refused = watcher.event("desired_refused", seq=7)
    assert (
        refused["stage"] == "replay"
        and "before this device's store was created" in (refused["reason"])
    )
    assert again.state.floor == 0 and again.server.current() is None
    assert again.state.enrolled > json.loads(captured)["signed"]["issued"]
    rig.assign(2)  # one issued after the enrolment is followed
    watcher.wait("state", lambda s: outcome(s) == (3, "serving"))
    assert served_const(again) == 2.0


# -- integrity at rest ------------------------------------------------------------------------


def _tamper(agent, version: int) -> None:
    """Edit one weight byte inside the stored model file (same size)."""
    path = agent.store.model_path(ModelRef("m", version))
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tampered_stored_model_is_quarantined_at_start_and_the_device_falls_back(
    agent, started, rig, watcher
):
    store = agent.store.root
    agent.stop()
    restarted = time.time()
    _tamper(agent, 2)  # the last good deployment's model
    again = started()
    failed = watcher.event("integrity_failed", model=ref("m", 2))
    assert "does not match its signed manifest" in failed["reason"]
    assert failed["stage"] == "integrity"
    assert not again.store.has(ModelRef("m", 2))
    assert list((store / "quarantine").iterdir())
    assert again.server.current() == main(1)  # the next good deployment, at once
    # then it follows its desired state again: m@2 is fetched anew and served
    watcher.wait(
        "state",
        lambda s: (
            s["started"] > restarted and outcome(s) == (2, "serving") and s["deployment"] == main(2)
        ),
    )
    assert served_const(again) == 2.0


def test_a_signed_rollback_re_checks_the_stored_file_first(agent, rig, watcher):
    _tamper(agent, 1)  # installed, not serving
    rig.assign(1, rollback=True)
    failed = watcher.event("integrity_failed", model=ref("m", 1))
    assert failed["seq"] == 3
    watcher.wait("state", lambda s: outcome(s) == (3, "serving"))
    assert served_const(agent) == 1.0  # re-downloaded, not the edited file
    progress = [e for e in watcher.events("download_progress") if e["model"] == ref("m", 1)]
    assert len(progress) == 2  # fetched again after the quarantine


def test_a_refused_newer_desired_state_does_not_hide_the_followed_one_going_stale(
    agent, rig, watcher
):
    rig.deploy({"main": "m@1"}, ttl_s=3.0, rollback=True)  # seq 3, followed
    watcher.wait("state", lambda s: outcome(s) == (3, "serving"))
    rig.deploy({"main": "m@2"}, seq=60, issued=time.time() + 3600)  # refused: skew
    watcher.wait("state", lambda s: outcome(s) == (60, "refused"))
    watcher.event("desired_stale", seq=3, timeout=10)  # the followed one still expires
    state = watcher.wait("state", lambda s: s["status"] == "stale")
    assert outcome(state) == (60, "refused") and served_const(agent) == 1.0
