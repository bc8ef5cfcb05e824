"""The agent end to end against a real mosquitto: publish, deploy, swap, refuse, fall back."""

from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from collections import namedtuple

import models
import numpy as np
import pytest
from brokers import free_port

from slimfleet.agent.download import PartialFile
from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.store import ModelStore, StateFile
from slimfleet.agent.wire import Manifest, ModelRef, make_manifest
from slimfleet.host.fleet.broker import EmbeddedBroker
from slimfleet.host.fleet.publish import build_manifest, publish_manifest

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def ref(name: str, version: int) -> dict:
    return {"name": name, "version": version}


def main(name: str, version: int) -> dict:
    """What the state document and events say slot main serves."""
    return {"main": [ref(name, version)]}


Usage = namedtuple("Usage", "total used free")
"""What ``shutil.disk_usage`` returns."""


def outcome(state: dict) -> tuple:
    desired = state["desired"] or {}
    return desired.get("seq"), desired.get("outcome")


def served_const(agent) -> float:
    return float((agent.infer({"x": X})["y"] - X)[0, 0])


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_publish_download_swap_with_events_state_and_telemetry(mosquitto, rig, watcher, protocol):
    rig.publish(models.add_const(1.0, pad_bytes=100_000), 1)
    agent = rig.agent(mosquitto.url, protocol)
    agent.start()
    try:
        watcher.wait("status", lambda s: s == "online")
        rig.assign(1)
        watcher.event("swap_ok", deployment=main("m", 1))
        assert served_const(agent) == 1.0
        progress = watcher.events("download_progress")
        assert progress[-1]["percent"] == 100.0 and progress[-1]["total_chunks"] == 7
        assert progress[-1]["model"] == ref("m", 1) and progress[-1]["seq"] == 1
        state = watcher.wait("state", lambda s: outcome(s) == (1, "serving"))
        assert state["status"] == "serving" and state["last_good"] == main("m", 1)
        assert state["deployment"] == main("m", 1)
        agent.infer({"x": X})
        tele = watcher.wait("telemetry", lambda t: t["slots"].get("main", {}).get("requests"))
        assert tele["slots"]["main"]["model"] == ref("m", 1)
        assert tele["slots"]["main"]["latency_ms"]["p50"] is not None

        rig.publish(models.add_const(2.0, pad_bytes=100_000), 2)
        rig.assign(2)
        event = watcher.event("swap_ok", deployment=main("m", 2))
        assert event["from"] == main("m", 1)
        assert served_const(agent) == 2.0
        state = watcher.wait("state", lambda s: outcome(s) == (2, "serving"))
        assert state["previous"] == main("m", 1) and state["last_good"] == main("m", 2)
        update = state["last_update"]
        assert update["bytes"] > 100_000 and update["resumed_chunks"] == 0
        assert update["download_s"] > 0 and 0 < update["activate_s"] < update["total_s"]
        assert agent.state.previous["main"].primary == ModelRef("m", 1)  # persisted too
    finally:
        agent.stop()
    watcher.wait("status", lambda s: s == "offline")


@pytest.fixture
def agent(mosquitto, rig, watcher):
    """An in-process agent serving m@1 (add 1.0), stopped after the test."""
    rig.publish(models.add_const(1.0), 1)
    agent = rig.agent(mosquitto.url)
    agent.start()
    try:
        rig.assign(1)
        watcher.wait("state", lambda s: outcome(s) == (1, "serving"))  # settled and saved
        yield agent
    finally:
        agent.stop()


def assert_refused(agent, watcher, seq: int, stage: str) -> dict:
    """Desired state ``seq`` was refused at ``stage``; m@1 still answers."""
    refused = watcher.event("desired_refused", seq=seq)
    assert refused["stage"] == stage, refused
    state = watcher.wait("state", lambda s: outcome(s) == (seq, "refused"))
    assert state["desired"]["stage"] == stage and state["desired"]["reason"] == refused["reason"]
    assert state["deployment"] == main("m", 1) and state["status"] == "serving"
    assert served_const(agent) == 1.0
    return refused


def test_a_spoiled_manifest_is_pending_and_the_repaired_one_is_followed(
    agent, rig, watcher, publisher
):
    """The broker's copy is a mirror: a manifest tampered with there was once refused for
    good, and publish --repair could not undo it. Like a bad chunk, it is retried."""
    rig.publish(models.add_const(2.0), 2)
    topic = rig.topics.manifest("m", 2)
    good = _retained(publisher, topic)
    envelope = json.loads(good)
    envelope["signed"]["size"] += 1  # tampered after signing
    publisher.put(topic, json.dumps(envelope).encode())
    rig.assign(2)
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "verify")
    assert outcome(state) == (2, "pending") and "bad signature" in state["desired"]["reason"]
    assert served_const(agent) == 1.0 and not watcher.events("desired_refused")
    publisher.put(topic, good)  # what publish --repair sends
    watcher.event("swap_ok", deployment=main("m", 2))
    assert served_const(agent) == 2.0


def test_older_version_is_refused_and_a_signed_rollback_accepted(agent, rig, watcher, publisher):
    captured_rollback = rig.desired({"main": "m@1"}, rollback=True)  # seq 2
    rig.publish(models.add_const(2.0), 2)
    rig.assign(2)  # seq 3
    watcher.event("swap_ok", deployment=main("m", 2))

    rig.assign(1)  # seq 4, not a rollback
    refused = watcher.event("desired_refused", seq=4)
    assert refused["stage"] == "verify" and "older than the last good m@2" in refused["reason"]
    assert served_const(agent) == 2.0

    # a rollback with a seq below the floor is a replay
    rig.put_desired(captured_rollback)
    replay = watcher.event("desired_refused", seq=2)
    assert replay["stage"] == "replay" and "not above the 4" in replay["reason"]

    rig.assign(1, rollback=True)  # seq 5
    watcher.event("swap_ok", deployment=main("m", 1), **{"from": main("m", 2)})
    assert served_const(agent) == 1.0
    progress = [e for e in watcher.events("download_progress") if e["model"] == ref("m", 1)]
    assert len(progress) == 1  # m@1 came from the store, not downloaded twice


def test_corrupted_chunk_is_refused_then_repaired_chunk_completes(agent, rig, watcher, publisher):
    path = rig.publish(models.add_const(2.0, pad_bytes=100_000), 2)
    chunk_topic = rig.topics.chunk("m", 2, 3)
    good = path.read_bytes()[3 * 16384 : 4 * 16384]
    publisher.put(chunk_topic, b"\0" * len(good))  # over the retained one
    rig.assign(2)
    failed = watcher.event("verify_failed", model=ref("m", 2))
    assert failed["stage"] == "download" and "chunk 3 does not match" in failed["reason"]
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "download")
    assert outcome(state) == (2, "pending") and state["deployment"] == main("m", 1)

    publisher.put(chunk_topic, good)  # the host repairs it; the agent retries by itself
    watcher.event("swap_ok", deployment=main("m", 2))
    assert served_const(agent) == 2.0
    resumed = [e for e in watcher.events("download_progress") if e["model"] == ref("m", 2)]
    assert resumed[-1]["resumed_chunks"] == 3  # chunks 0-2 were not fetched again


def test_model_that_fails_to_load_is_not_swapped_in_nor_retried(agent, rig, watcher):
    signer = rig.fleet.signer()
    manifest, chunks = make_manifest(
        "m", 2, b"not an onnx model" * 1000, io={}, opset=13, key_id=signer.key_id
    )
    publish_manifest(rig.fleet, manifest, chunks, signer=signer)
    rig.assign(2)
    failed = watcher.event("swap_failed", model=ref("m", 2))
    assert failed["stage"] == "load" and failed["slot"] == "main"
    assert_refused(agent, watcher, 2, "load")
    time.sleep(1.5)  # longer than the retry backoff: a load failure is not retried
    assert len(watcher.events("swap_started")) == 2
    saved = json.loads((agent.store.root / "desired.json").read_text())
    assert (saved["outcome"], saved["stage"], saved["floor"]) == ("refused", "load", 2)


def test_model_whose_smoke_test_fails_is_not_swapped_in(agent, rig, watcher):
    signer = rig.fleet.signer()
    path = rig.model_file(models.add_const(2.0), "m-2")
    manifest, chunks = build_manifest(signer, path, "m", 2)
    manifest.smoke.outputs = {k: v + 5 for k, v in manifest.smoke.outputs.items()}
    publish_manifest(rig.fleet, manifest, chunks, signer=signer)
    rig.assign(2)
    refused = assert_refused(agent, watcher, 2, "smoke_test")
    assert "differs from the expected" in refused["reason"]


def test_model_over_the_smoke_latency_budget_is_not_swapped_in(agent, rig, watcher):
    rig.publish(models.add_const(2.0), 2, max_latency_ms=0.000001)  # the publisher's budget
    rig.assign(2)
    refused = assert_refused(agent, watcher, 2, "smoke_test")
    assert "over the budget" in refused["reason"]


def test_slower_model_is_rolled_back_by_the_watch_window(mosquitto, rig, watcher):
    rig.publish(models.mlp(hidden=16), 1)
    agent = rig.agent(
        mosquitto.url, watch={"window_s": 20, "min_requests": 20, "max_p95_ratio": 3.0}
    )
    agent.start()
    stop, served, errors = threading.Event(), [], []

    def client() -> None:
        x = np.ones((32, 64), dtype=np.float32)
        while not stop.is_set():
            try:
                agent.infer({"x": x})
                served.append(1)
            except SlimfleetError as exc:
                errors.append(exc)

    thread = threading.Thread(target=client)
    try:
        rig.assign(1)
        watcher.event("swap_ok", deployment=main("m", 1))
        thread.start()
        while len(served) < 200:
            time.sleep(0.01)
        # same signature, ~300x slower (about 5 ms here): above the watch's 2 ms noise floor
        rig.publish(models.mlp(hidden=65536), 2)
        rig.assign(2)
        watcher.event("swap_ok", deployment=main("m", 2))
        fallback = watcher.event("fallback", stage="watch")
        assert "p95 latency" in fallback["reason"] and fallback["reason"].startswith("slot main")
        assert fallback["to"] == main("m", 1) and fallback["deployment"] == main("m", 2)
        refused = watcher.event("desired_refused", seq=2)
        assert refused["stage"] == "watch"
        state = watcher.wait("state", lambda s: outcome(s) == (2, "refused"))
        assert state["deployment"] == main("m", 1) and state["last_good"] == main("m", 1)
        assert agent.server.slot_model("main") == ModelRef("m", 1)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        agent.stop()
    assert not errors


def test_malformed_messages_are_reported_and_the_agent_keeps_running(
    agent, rig, watcher, publisher
):
    desired_topic = rig.topics.device(rig.device, "desired")
    for body in (b"\xff\xfe not utf-8", b"{not json", b'{"signed": {"kind": "desired"}}'):
        before = len(watcher.events("desired_refused"))
        publisher.put(desired_topic, body)
        watcher.wait("events", lambda e, n=before: len(watcher.events("desired_refused")) > n)
        failed = watcher.events("desired_refused")[-1]
        assert failed["stage"] == "verify" and failed["model"] is None
    publisher.put(rig.topics.manifest("m", 2), b'{"signed": [1, 2], "signature": "x"}')
    rig.assign(2)  # a junk manifest: retried (pending), the device keeps serving m@1
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "verify")
    assert outcome(state) == (2, "pending") and served_const(agent) == 1.0

    rig.publish(models.add_const(3.0), 3)  # and it still follows new desired states
    rig.assign(3)
    watcher.event("swap_ok", deployment=main("m", 3))
    assert served_const(agent) == 3.0


def test_a_document_refused_again_for_the_same_reason_is_reported_once(
    agent, rig, watcher, publisher
):
    # the state subscription re-fetches retained messages after a flood and every 60 s:
    # a retained forgery must not become a desired_refused event a minute, forever
    desired_topic = rig.topics.device(rig.device, "desired")
    publisher.put(desired_topic, b"{not json")
    watcher.event("desired_refused", stage="verify")
    for _ in range(3):
        publisher.put(desired_topic, b"{not json")  # what a resync re-delivers
    publisher.put(desired_topic, b"{still not json")
    watcher.wait("events", lambda e: len(watcher.events("desired_refused")) >= 2)
    time.sleep(0.5)  # room for any repeat to arrive
    assert len(watcher.events("desired_refused")) == 2  # one per distinct payload
    publisher.put(desired_topic, b"{not json")  # after another payload: reported again
    watcher.wait("events", lambda e: len(watcher.events("desired_refused")) >= 3)


def test_expired_manifest_is_refused_for_good(agent, rig, watcher, publisher):
    rig.publish(models.add_const(2.0), 2, ttl_s=0.5)
    time.sleep(1.0)
    rig.assign(2)
    refused = assert_refused(agent, watcher, 2, "verify")
    assert "the manifest expired" in refused["reason"]
    # A published version never changes, so it never becomes valid: no retries.
    time.sleep(3 * agent.timing.retry.max_s)  # several retry periods
    assert len(watcher.events("desired_refused")) == 1


def test_signed_rollback_to_an_installed_version_works_after_its_manifest_expired(
    agent, rig, watcher, publisher
):
    rig.publish(models.add_const(2.0), 2, ttl_s=5)
    rig.assign(2)
    watcher.event("swap_ok", deployment=main("m", 2))
    rig.publish(models.add_const(3.0), 3)
    rig.assign(3)
    watcher.event("swap_ok", deployment=main("m", 3))
    manifest = Manifest.from_dict(json.loads(agent.store.read_manifest(ModelRef("m", 2)))["signed"])
    time.sleep(max(0.0, manifest.expires - time.time()) + 0.5)
    assert manifest.expired()

    rig.assign(2, rollback=True)
    watcher.event("swap_ok", deployment=main("m", 2), **{"from": main("m", 3)})
    assert served_const(agent) == 2.0
    progress = [e for e in watcher.events("download_progress") if e["model"] == ref("m", 2)]
    assert len(progress) == 1  # from the store, not downloaded again
    assert watcher.events("desired_refused") == []


def test_model_over_the_size_limit_is_refused_before_download(mosquitto, rig, watcher):
    rig.publish(models.add_const(1.0, pad_bytes=100_000), 1)
    agent = rig.agent(mosquitto.url, max_model_bytes=50_000)
    agent.start()
    try:
        rig.assign(1)
        refused = watcher.event("desired_refused", seq=1)
        assert refused["stage"] == "verify"
        assert "over this device's limit of 50000" in refused["reason"]
        state = watcher.wait("state", lambda s: outcome(s) == (1, "refused"))
        assert state["status"] == "failed" and state["deployment"] == {}
        assert watcher.events("download_progress") == []
        assert agent.server.current() is None
    finally:
        agent.stop()


def test_restart_serves_the_last_good_deployment_at_once_without_a_broker(agent, rig):
    agent.stop()  # the fixture's stop() again at the end is harmless
    offline = rig.agent(f"mqtt://127.0.0.1:{free_port()}")  # nothing listens there
    offline.start()
    try:
        assert offline.server.current() == main("m", 1)  # when start() returns
        assert served_const(offline) == 1.0
        assert not offline.link.connected
        assert offline.state_document()["floor"] == 1
    finally:
        offline.stop()


def test_end_to_end_on_the_embedded_amqtt_broker(make_rig, watcher_for):
    with EmbeddedBroker(port=free_port()) as broker:
        rig = make_rig(broker.url)
        rig.publish(models.add_const(7.0, pad_bytes=50_000), 1)
        watcher = watcher_for(broker.url, rig)
        agent = rig.agent(broker.url)
        agent.start()
        try:
            rig.assign(1)
            watcher.event("swap_ok", deployment=main("m", 1), timeout=30)
            assert served_const(agent) == 7.0
            watcher.wait("state", lambda s: outcome(s) == (1, "serving"))
        finally:
            agent.stop()


def _retained(publisher, topic: str) -> bytes:
    """Read one retained message with the publisher's client."""
    got = threading.Event()
    box: list[bytes] = []

    def on_message(_c, _u, msg) -> None:
        if msg.topic == topic:
            box.append(msg.payload)
            got.set()

    publisher.client.on_message = on_message
    publisher.client.subscribe(topic, qos=1)
    assert got.wait(10), f"nothing retained on {topic}"
    publisher.client.unsubscribe(topic)
    return box[0]


def serving_at_start(watcher, started_after: float) -> dict:
    """The first state a (re)started agent process publishes."""
    return watcher.wait("state", lambda s: s["started"] > started_after, timeout=30)


def test_sigkill_mid_download_restarts_serving_last_good_and_resumes(
    mosquitto, rig, watcher, publisher, spawn_agent
):
    rig.publish(models.add_const(1.0), 1)
    config = rig.write_agent_yaml(mosquitto.url)
    agent = spawn_agent(config)
    watcher.wait("status", lambda s: s == "online", timeout=30)  # enrolled before assign
    rig.assign(1)
    watcher.event("swap_ok", deployment=main("m", 1))

    # m@2 is on its way: only its first 10 chunks are on the broker so far
    signer = rig.fleet.signer()
    path = rig.model_file(models.add_const(2.0, pad_bytes=400_000), "m-2")
    manifest, chunks = build_manifest(signer, path, "m", 2, chunk_size=16384)
    for i in range(10):
        publisher.put(rig.topics.chunk("m", 2, i), chunks[i])
    publisher.put(rig.topics.manifest("m", 2), signer.sign(manifest.to_dict()))
    rig.assign(2)
    watcher.event("download_progress", model=ref("m", 2), done_chunks=10)
    time.sleep(1.0)  # idle, the agent records its progress
    agent.kill()
    watcher.wait("status", lambda s: s == "offline")

    restarted = time.time()
    spawn_agent(config)
    first = serving_at_start(watcher, restarted)
    assert first["deployment"] == main("m", 1)  # the last good deployment, at once
    for i in range(10, len(chunks)):
        publisher.put(rig.topics.chunk("m", 2, i), chunks[i])
    watcher.event("swap_ok", deployment=main("m", 2), timeout=30)
    after = [e for e in watcher.events("download_progress") if e["resumed_chunks"]]
    assert after and {e["resumed_chunks"] for e in after} == {10}
    watcher.wait("state", lambda s: outcome(s) == (2, "serving"))


def test_sigkill_mid_swap_restarts_serving_last_good(mosquitto, rig, watcher, spawn_agent):
    rig.publish(models.add_const(1.0), 1)
    rig.publish(models.lstm(steps=2000, hidden=512), 2, chunk_size=256 * 1024)  # ~1 s smoke test
    config = rig.write_agent_yaml(mosquitto.url)
    agent = spawn_agent(config)
    watcher.wait("status", lambda s: s == "online", timeout=30)  # enrolled before assign
    rig.assign(1)
    watcher.event("swap_ok", deployment=main("m", 1))
    rig.assign(2)
    watcher.event("swap_started", deployment=main("m", 2), timeout=30)
    agent.kill()
    assert not [e for e in watcher.events("swap_ok") if e["deployment"] == main("m", 2)]
    state = json.loads((rig.tmp / "store" / "state.json").read_text())
    assert state["current"] == state["last_good"] == {"main": {"models": [ref("m", 1)]}}

    restarted = time.time()
    agent = spawn_agent(config)
    assert serving_at_start(watcher, restarted)["deployment"] == main("m", 1)  # at once
    # then it resumes the interrupted swap from its store
    watcher.event("swap_ok", deployment=main("m", 2), timeout=30, **{"from": main("m", 1)})

    assert agent.terminate() == 0  # SIGTERM: a clean shutdown says goodbye itself
    watcher.wait("status", lambda s: s == "offline")


def test_bad_config_is_one_line_and_exit_code_2(tmp_path, spawn_agent):
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: cam-01\nbroker: ftp://nowhere\n")
    agent = spawn_agent(config)
    assert agent.proc.wait(timeout=60) == 2
    error = agent.log.read_text()
    assert error.count("\n") == 1 and error.startswith(f"error: {config}:")


def test_a_desired_state_that_cannot_be_saved_is_still_followed(agent, rig, watcher, caplog):
    saved = agent.store.root / "desired.json"
    saved.unlink()
    saved.mkdir()  # the write fails with an OSError, as on a full or read-only disk
    (saved / "keep").touch()
    for version in (2, 3):
        rig.publish(models.add_const(float(version)), version)
        rig.assign(version)
        watcher.event("swap_ok", deployment=main("m", version))
        assert served_const(agent) == float(version)
    assert "cannot persist the desired state" in caplog.text


def test_a_failed_telemetry_report_does_not_stop_the_next_ones(agent, watcher, monkeypatch):
    # A fault no real part produces on demand: the first snapshot raises.
    real_snapshot = agent.telemetry.snapshot
    calls = []

    def failing_once() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_snapshot()

    patched = time.time()
    monkeypatch.setattr(agent.telemetry, "snapshot", failing_once)
    watcher.wait("telemetry", lambda t: t["ts"] > patched)  # published after the failure
    assert len(calls) > 1


def test_a_failed_install_keeps_the_download_and_the_retry_installs_it(agent, rig, watcher):
    rig.publish(models.add_const(5.0, pad_bytes=100_000), 1, name="n")
    blocker = agent.store.root / "models" / "n"
    blocker.write_bytes(b"")  # a file where the model's folder must go: the install fails
    rig.deploy({"main": "n@1"})
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "install")
    assert outcome(state) == (2, "pending") and "cannot install" in state["desired"]["reason"]
    assert served_const(agent) == 1.0
    first = [e for e in watcher.events("download_progress") if e["model"] == ref("n", 1)]
    assert first[-1]["percent"] == 100.0 and first[-1]["resumed_chunks"] == 0
    assert list((agent.store.root / "partial").glob("n-1-*.part"))  # kept

    blocker.unlink()  # room again: the retry installs the same download
    state = watcher.wait("state", lambda s: outcome(s) == (2, "serving"))
    assert served_const(agent) == 5.0
    assert state["last_update"]["resumed_chunks"] == 7  # every chunk: nothing fetched twice
    again = [e for e in watcher.events("download_progress") if e["model"] == ref("n", 1)]
    assert again == first
    assert not list((agent.store.root / "partial").glob("n-1-*"))


def test_a_full_disk_never_stops_the_agent_and_state_json_catches_up(
    agent, rig, watcher, monkeypatch, caplog
):
    # A disk full while state.json is written (after a swap, on a desired state, at the
    # end of a watch window) raised out of the agent: the swap was reported as failed
    # and retried, the desired state was lost, and a restart exited 70 (the device dark).
    real_save = ModelStore.save_state

    def no_space(store, state):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StateFile, "RETRY_S", 0.2)
    monkeypatch.setattr(ModelStore, "save_state", no_space)
    rig.publish(models.add_const(2.0), 2)
    rig.assign(2)
    watcher.wait("state", lambda s: outcome(s) == (2, "serving"))
    assert served_const(agent) == 2.0
    assert "No space left on device" in caplog.text
    assert agent.store.load_state().current["main"].primary == ModelRef("m", 1)
    assert agent.store.has(ModelRef("m", 1))  # kept: state.json still points at it

    monkeypatch.setattr(ModelStore, "save_state", real_save)  # room again
    deadline = time.monotonic() + 10
    while agent.store.load_state().current["main"].primary != ModelRef("m", 2):
        assert time.monotonic() < deadline, "state.json never caught up"
        time.sleep(0.05)

    agent.stop()
    monkeypatch.setattr(ModelStore, "save_state", no_space)  # full again, then a restart
    restarted = rig.agent(f"mqtt://127.0.0.1:{free_port()}")
    restarted.start()
    try:
        assert served_const(restarted) == 2.0
    finally:
        restarted.stop()


def test_a_model_the_disk_cannot_hold_is_pending_with_its_size(agent, rig, watcher, monkeypatch):
    def no_space(partial):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PartialFile, "open", no_space)  # preallocation on a full disk
    rig.publish(models.add_const(5.0, pad_bytes=100_000), 1, name="n")
    rig.deploy({"main": "n@1"})
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "download")
    assert outcome(state) == (2, "pending")
    assert state["desired"]["reason"].startswith("the store's disk is full: n@1 needs ")
    assert "bytes free" in state["desired"]["reason"]
    assert served_const(agent) == 1.0


def test_a_model_larger_than_the_whole_disk_is_refused_not_retried(
    agent, rig, watcher, monkeypatch
):
    def no_space(partial):
        raise OSError(errno.ENOSPC, "No space left on device")

    def tiny_disk(path):
        return Usage(total=50_000, used=40_000, free=10_000)

    monkeypatch.setattr(PartialFile, "open", no_space)
    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    rig.publish(models.add_const(5.0, pad_bytes=100_000), 1, name="n")
    rig.deploy({"main": "n@1"})
    refused = watcher.event("desired_refused", stage="download")
    assert "more than the store's whole disk (50000 bytes)" in refused["reason"]
    assert refused["reason"].startswith("n@1 needs ")
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("outcome") == "refused")
    assert outcome(state)[1] == "refused"
    assert served_const(agent) == 1.0
