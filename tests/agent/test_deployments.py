"""Deployments of named slots against a real mosquitto: a pipeline switches as one."""

from __future__ import annotations

import json
import time

import models
import numpy as np
import pytest
from e2e_rig import OipServer as RemoteServer  # y = x + 100 after delay_s

from slimfleet.agent.inference import UnknownSlotError
from slimfleet.agent.wire import ModelRef

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def ref(name: str, version: int) -> dict:
    return {"name": name, "version": version}


def outcome(state: dict) -> tuple:
    """(seq, outcome) of the desired state a state document reports."""
    desired = state["desired"] or {}
    return desired.get("seq"), desired.get("outcome")


def const(agent, slot: str) -> float:
    return float((agent.infer({"x": X}, slot=slot)["y"] - X)[0, 0])


def publish_pipeline(rig, version: int, det: float, rec: float) -> None:
    rig.publish(models.add_const(det), version, name="det")
    rig.publish(models.add_const(rec), version, name="rec")


def pipeline(version: int) -> dict:
    return {"det": f"det@{version}", "rec": f"rec@{version}"}


@pytest.fixture
def two_slot(mosquitto, rig, watcher):
    """An agent serving det@1 (+1) and rec@1 (+10)."""
    publish_pipeline(rig, 1, 1.0, 10.0)
    agent = rig.agent(mosquitto.url)
    agent.start()
    try:
        rig.deploy(pipeline(1))
        watcher.event("swap_ok", deployment={"det": [ref("det", 1)], "rec": [ref("rec", 1)]})
        yield agent
    finally:
        agent.stop()


def test_a_pipeline_switches_together_and_reports_its_slots(two_slot, rig, watcher):
    agent = two_slot
    assert (const(agent, "det"), const(agent, "rec")) == (1.0, 10.0)
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("outcome") == "serving")
    assert state["schema"] == 2 and state["status"] == "serving" and state["floor"] == 1
    assert state["deployment"] == {"det": [ref("det", 1)], "rec": [ref("rec", 1)]}
    assert state["desired"]["seq"] == 1 and state["started"] > 0

    publish_pipeline(rig, 2, 2.0, 20.0)
    rig.deploy(pipeline(2))
    ok = watcher.event("swap_ok", deployment={"det": [ref("det", 2)], "rec": [ref("rec", 2)]})
    assert ok["from"] == {"det": [ref("det", 1)], "rec": [ref("rec", 1)]} and ok["seq"] == 2
    assert (const(agent, "det"), const(agent, "rec")) == (2.0, 20.0)
    state = watcher.wait("state", lambda s: outcome(s) == (2, "serving"))
    assert state["previous"] == {"det": [ref("det", 1)], "rec": [ref("rec", 1)]}
    with pytest.raises(UnknownSlotError):
        agent.infer({"x": X}, slot="main")
    tele = watcher.wait(
        "telemetry",
        lambda t: t["slots"]["det"]["requests"] and t["slots"]["det"]["model"] == ref("det", 2),
    )
    assert tele["schema"] == 2 and tele["slots"]["det"]["model"] == ref("det", 2)
    assert tele["slots"]["rec"]["model"] == ref("rec", 2) and tele["client_errors"] >= 0
    assert tele["slots"]["det"]["tiers"]["det@2"]["runs"] >= 1


def test_a_broken_second_model_keeps_the_whole_old_set(two_slot, rig, watcher):
    agent = two_slot
    rig.publish(models.add_const(2.0), 2, name="det")
    signer = rig.fleet.signer()
    from slimfleet.agent.wire import make_manifest
    from slimfleet.host.fleet.publish import publish_manifest

    manifest, chunks = make_manifest(
        "rec", 2, b"not an onnx model" * 100, io={}, opset=13, key_id=signer.key_id
    )
    publish_manifest(rig.fleet, manifest, chunks, signer=signer)
    rig.deploy(pipeline(2))
    failed = watcher.event("swap_failed", slot="rec", model=ref("rec", 2))
    assert failed["stage"] == "load"
    refused = watcher.event("desired_refused", seq=2)
    assert refused["stage"] == "load" and "rec@2" in refused["reason"]
    state = watcher.wait("state", lambda s: outcome(s) == (2, "refused"))
    assert state["desired"]["stage"] == "load" and state["floor"] == 2
    assert state["deployment"] == {"det": [ref("det", 1)], "rec": [ref("rec", 1)]}
    assert (const(agent, "det"), const(agent, "rec")) == (1.0, 10.0)
    assert not [e for e in watcher.events("swap_ok") if e["seq"] == 2]


def test_an_empty_deployment_serves_nothing_and_keeps_the_floor(two_slot, rig, watcher):
    agent = two_slot
    rig.deploy({})
    state = watcher.wait(
        "state", lambda s: (s["desired"] or {}).get("seq") == 2 and s["deployment"] == {}
    )
    assert state["status"] == "idle" and state["floor"] == 2
    assert agent.server.slots() == []
    with pytest.raises(UnknownSlotError):
        agent.infer({"x": X}, slot="det")
    rig.deploy(pipeline(1))  # back, from the store
    watcher.wait("state", lambda s: outcome(s) == (3, "serving"))
    assert const(agent, "det") == 1.0


def test_a_chain_tier_that_fails_to_load_is_skipped(two_slot, rig, watcher):
    agent = two_slot
    signer = rig.fleet.signer()
    from slimfleet.agent.wire import make_manifest
    from slimfleet.host.fleet.publish import publish_manifest

    manifest, chunks = make_manifest(
        "rec", 3, b"broken" * 100, io={}, opset=13, key_id=signer.key_id
    )
    publish_manifest(rig.fleet, manifest, chunks, signer=signer)
    rig.publish(models.add_const(40.0), 4, name="rec")
    rig.deploy({"det": "det@1", "rec": ["rec@3", "rec@4"]})
    skipped = watcher.event("tier_skipped", slot="rec", model=ref("rec", 3))
    assert skipped["stage"] == "load"
    state = watcher.wait("state", lambda s: outcome(s) == (2, "serving"))
    assert state["deployment"]["rec"] == [ref("rec", 4)]
    assert const(agent, "rec") == 40.0


def test_no_request_sees_a_torn_deployment_under_a_tiny_switch_interval(
    mosquitto, rig, watcher, pipeline_clients
):
    versions = range(1, 5)
    for v in versions:
        publish_pipeline(rig, v, float(v), 10.0 * v)
    agent = rig.agent(mosquitto.url)
    agent.start()
    try:
        rig.deploy(pipeline(1))
        watcher.event("swap_ok", seq=1)
        with pipeline_clients(agent.server) as clients:
            for v in [*versions[1:], 1, 2]:
                rig.deploy(pipeline(v), rollback=True)
                watcher.event("swap_ok", seq=rig.seq, timeout=60)
    finally:
        agent.stop()
    assert clients.failures == []
    assert clients.seen >= {1, 2, 3, 4}


def test_a_slot_with_unchanged_models_is_not_loaded_again(two_slot, rig, watcher):
    rig.publish(models.add_const(2.0), 2, name="det")
    rig.deploy({"det": "det@2", "rec": "rec@1"})
    ok = watcher.event("swap_ok", seq=2)
    assert ok["deployment"] == {"det": [ref("det", 2)], "rec": [ref("rec", 1)]}
    progress = {
        json.dumps(e["model"]) for e in watcher.events("download_progress") if e["seq"] == 2
    }
    assert progress == {json.dumps(ref("det", 2))}
    state = watcher.wait("state", lambda s: outcome(s) == (2, "serving"))
    assert state["last_update"]["downloaded"] == [ModelRef("det", 2).to_dict()]


# -- a chain per slot -----------------------------------------------------------------------

GATE_MODULE = "def first(outputs):\n    return float(outputs['y'].flat[0])\n"


@pytest.fixture
def chain_agent(mosquitto, rig, watcher, tmp_path, monkeypatch):
    """An agent whose agent.yaml names the gate function ``first`` (y[0, 0])."""
    (tmp_path / "gates_for_test.py").write_text(GATE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rig.publish(models.add_const(1.0), 7, name="ocr")  # the quick tier: unsure below x = 4
    rig.publish(models.add_const(40.0), 4, name="ocr")
    agent = rig.agent(mosquitto.url, confidence_functions={"first": "gates_for_test:first"})
    agent.start()
    watcher.wait("status", lambda s: s == "online")
    yield agent
    agent.stop()


def test_a_chain_escalates_unsure_answers_and_reports_each_tier(chain_agent, rig, watcher):
    gate = {"function": "first", "threshold": 5.0}
    rig.deploy({"main": {"models": [ref("ocr", 7), ref("ocr", 4)], "gate": gate}})
    state = watcher.wait("state", lambda s: outcome(s) == (1, "serving"))
    assert state["deployment"] == {"main": [ref("ocr", 7), ref("ocr", 4)]}
    unsure = chain_agent.server.predict("main", {"x": np.zeros((1, 4), np.float32)})
    assert (unsure.tier, unsure.escalations, unsure.model) == ("ocr@4", 1, ModelRef("ocr", 4))
    assert float(unsure.outputs["y"][0, 0]) == 40.0
    sure = chain_agent.server.predict("main", {"x": np.full((1, 4), 10.0, np.float32)})
    assert (sure.tier, sure.escalations) == ("ocr@7", 0)
    tele = watcher.wait("telemetry", lambda t: t["slots"]["main"]["requests"] == 2)
    figures = tele["slots"]["main"]
    assert figures["escalations"] == 1 and figures["model"] == ref("ocr", 7)
    assert {k: v["runs"] for k, v in figures["tiers"].items()} == {"ocr@7": 2, "ocr@4": 1}


def test_a_remote_tier_answers_escalations_within_its_timeout(chain_agent, rig, watcher):
    server = RemoteServer()
    try:
        gate = {"function": "first", "threshold": 5.0}
        remote = {"url": server.url, "timeout_s": 0.5}
        rig.deploy({"main": {"models": [ref("ocr", 7)], "gate": gate, "remote": remote}})
        watcher.wait("state", lambda s: outcome(s) == (1, "serving"))
        answer = chain_agent.server.predict("main", {"x": np.zeros((1, 4), np.float32)})
        assert (answer.tier, answer.model, answer.escalations) == ("remote", None, 1)
        assert float(answer.outputs["y"][0, 0]) == 100.0 and server.calls == 1

        server.delay_s = 2.0  # now slower than the slot's timeout
        started = time.monotonic()
        late = chain_agent.server.predict("main", {"x": np.zeros((1, 4), np.float32)})
        assert time.monotonic() - started < 1.5  # the timeout was honoured
        assert late.tier == "ocr@7" and float(late.outputs["y"][0, 0]) == 1.0  # best local
        watcher.wait("telemetry", lambda t: "remote" in t["slots"]["main"]["tiers"])
        time.sleep(1.5)  # the intervals after the two requests
        watcher.events()  # take in everything published so far
        runs = [
            t["slots"]["main"]["tiers"].get("remote", {}).get("runs", 0)
            for t in watcher.seen["telemetry"]
            if "main" in t["slots"]
        ]
        assert sum(runs) == 2
    finally:
        server.close()


def test_a_gate_function_that_does_not_import_refuses_the_deployment(chain_agent, rig, watcher):
    gate = {"function": "no_such_module:nothing", "threshold": 0.5}
    rig.deploy({"main": {"models": [ref("ocr", 7), ref("ocr", 4)], "gate": gate}})
    refused = watcher.event("desired_refused", seq=1)
    assert refused["stage"] == "load" and "cannot import no_such_module" in refused["reason"]
    assert chain_agent.server.current() is None
