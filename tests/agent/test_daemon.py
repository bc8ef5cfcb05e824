"""The agent end to end against a real mosquitto: publish, assign, swap, refuse, fall back."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import models
import numpy as np
import pytest
from brokers import free_port

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.wire import Manifest, ModelRef, make_manifest
from slimfleet.host.fleet.broker import EmbeddedBroker
from slimfleet.host.fleet.publish import build_manifest, publish_manifest

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def ref(name: str, version: int) -> dict:
    return {"name": name, "version": version}


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
        watcher.event("swap_ok", model=ref("m", 1))
        assert served_const(agent) == 1.0
        progress = watcher.events("download_progress")
        assert progress[-1]["percent"] == 100.0 and progress[-1]["total_chunks"] == 7
        state = watcher.wait("state", lambda s: s["current"] == ref("m", 1))
        assert state["status"] == "serving" and state["last_good"] == ref("m", 1)
        agent.infer({"x": X})
        tele = watcher.wait("telemetry", lambda t: t["requests"] > 0)
        assert tele["model"] == ref("m", 1) and tele["latency_ms"]["p50"] is not None

        rig.publish(models.add_const(2.0, pad_bytes=100_000), 2)
        rig.assign(2)
        event = watcher.event("swap_ok", model=ref("m", 2))
        assert event["from"] == ref("m", 1)
        assert served_const(agent) == 2.0
        state = watcher.wait(
            "state", lambda s: (s["last_update"] or {}).get("model") == ref("m", 2)
        )
        assert state["previous"] == ref("m", 1) and state["last_good"] == ref("m", 2)
        update = state["last_update"]
        assert update["bytes"] > 100_000 and update["resumed_chunks"] == 0
        assert update["download_s"] > 0 and 0 < update["activate_s"] < update["total_s"]
        assert agent.state.previous.version == 1  # persisted too
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
        watcher.event("swap_ok", model=ref("m", 1))
        yield agent
    finally:
        agent.stop()


def assert_still_serving_v1(agent, watcher, stage: str) -> dict:
    """The failure to reach m@2 was reported; m@1 still answers."""
    fallback = watcher.event("fallback", model=ref("m", 2))
    assert fallback["to"] == ref("m", 1) and fallback["stage"] == stage
    state = watcher.wait("state", lambda s: (s["error"] or {}).get("stage") == stage)
    assert state["current"] == ref("m", 1) and state["desired"]["version"] == 2
    assert served_const(agent) == 1.0
    return fallback


def test_bad_signature_is_refused(agent, rig, watcher, publisher):
    rig.publish(models.add_const(2.0), 2)
    topic = rig.topics.manifest("m", 2)
    envelope = json.loads(_retained(publisher, topic))
    envelope["signed"]["size"] += 1  # tampered after signing
    publisher.put(topic, json.dumps(envelope).encode())
    publisher.put(rig.topics.device(rig.device, "desired"), rig.signed_desired(2))
    failed = watcher.event("verify_failed", model=ref("m", 2))
    assert failed["stage"] == "manifest" and "bad signature" in failed["reason"]
    assert_still_serving_v1(agent, watcher, "manifest")


def test_older_version_is_refused_and_a_signed_rollback_accepted(agent, rig, watcher, publisher):
    captured_rollback = rig.signed_desired(1, rollback=True)  # issued now
    rig.publish(models.add_const(2.0), 2)
    rig.assign(2)
    watcher.event("swap_ok", model=ref("m", 2))

    rig.assign(1)  # not a rollback
    failed = watcher.event("verify_failed", model=ref("m", 1))
    assert failed["stage"] == "version" and "older than the last good m@2" in failed["reason"]
    assert served_const(agent) == 2.0

    # a rollback issued before the current desired state is a replay
    publisher.put(rig.topics.device(rig.device, "desired"), captured_rollback)
    replay = watcher.event("verify_failed", stage="desired")
    assert "replay" in replay["reason"]

    rig.assign(1, rollback=True)
    watcher.event("swap_ok", model=ref("m", 1), **{"from": ref("m", 2)})
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
    assert_still_serving_v1(agent, watcher, "download")

    publisher.put(chunk_topic, good)  # the host repairs it; the agent retries by itself
    watcher.event("swap_ok", model=ref("m", 2))
    assert served_const(agent) == 2.0
    resumed = [e for e in watcher.events("download_progress") if e["model"] == ref("m", 2)]
    assert resumed[-1]["resumed_chunks"] == 3  # chunks 0-2 were not fetched again


def test_model_that_fails_to_load_is_not_swapped_in(agent, rig, watcher):
    signer = rig.fleet.signer()
    manifest, chunks = make_manifest(
        "m", 2, b"not an onnx model" * 1000, io={}, opset=13, key_id=signer.key_id
    )
    publish_manifest(rig.fleet, manifest, chunks, signer=signer)
    rig.assign(2)
    failed = watcher.event("swap_failed", model=ref("m", 2))
    assert failed["stage"] == "load"
    assert_still_serving_v1(agent, watcher, "load")
    time.sleep(1.5)  # longer than the retry backoff: a load failure is not retried
    assert len(watcher.events("swap_started")) == 2
    assert json.loads((agent.store.root / "desired.json").read_text())["failed"] is True


def test_model_whose_smoke_test_fails_is_not_swapped_in(agent, rig, watcher):
    signer = rig.fleet.signer()
    path = rig.model_file(models.add_const(2.0), "m-2")
    manifest, chunks = build_manifest(signer, path, "m", 2)
    manifest.smoke.outputs = {k: v + 5 for k, v in manifest.smoke.outputs.items()}
    publish_manifest(rig.fleet, manifest, chunks, signer=signer)
    rig.assign(2)
    failed = watcher.event("swap_failed", model=ref("m", 2))
    assert failed["stage"] == "smoke" and "differs from the expected" in failed["reason"]
    assert_still_serving_v1(agent, watcher, "smoke")


def test_model_over_the_smoke_latency_budget_is_not_swapped_in(agent, rig, watcher):
    rig.publish(models.add_const(2.0), 2, max_latency_ms=0.000001)  # the publisher's budget
    rig.assign(2)
    failed = watcher.event("swap_failed", model=ref("m", 2))
    assert failed["stage"] == "latency"
    assert_still_serving_v1(agent, watcher, "latency")


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
        watcher.event("swap_ok", model=ref("m", 1))
        thread.start()
        while len(served) < 200:
            time.sleep(0.01)
        rig.publish(models.mlp(hidden=8192), 2)  # same signature, ~40x slower
        rig.assign(2)
        watcher.event("swap_ok", model=ref("m", 2))
        fallback = watcher.event("fallback", model=ref("m", 2))
        assert fallback["stage"] == "watch" and "p95 latency" in fallback["reason"]
        assert fallback["to"] == ref("m", 1)
        state = watcher.wait("state", lambda s: (s["error"] or {}).get("stage") == "watch")
        assert state["current"] == ref("m", 1) and state["last_good"] == ref("m", 1)
        assert agent.serving.current.version == 1
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        agent.stop()
    assert not errors


def test_swaps_under_concurrent_requests_fail_no_request(mosquitto, rig, watcher):
    rig.publish(models.add_const(1.0), 1)
    agent = rig.agent(mosquitto.url)
    agent.start()
    stop = threading.Event()
    seen: list[set[float]] = []
    errors: list[Exception] = []

    def client() -> None:
        constants = set()
        while not stop.is_set():
            try:
                constants.add(float((agent.infer({"x": X})["y"] - X).max()))
            except Exception as exc:
                errors.append(exc)
        seen.append(constants)

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        rig.assign(1)
        watcher.event("swap_ok", model=ref("m", 1))
        for t in threads:
            t.start()
        for version in (2, 3, 4, 5):
            rig.publish(models.add_const(float(version)), version)
            rig.assign(version)
            watcher.event("swap_ok", model=ref("m", version))
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
        agent.stop()
    assert errors == []
    answers = set().union(*seen)
    assert answers <= {1.0, 2.0, 3.0, 4.0, 5.0} and len(answers) >= 3


def test_malformed_messages_are_reported_and_the_agent_keeps_running(
    agent, rig, watcher, publisher
):
    desired_topic = rig.topics.device(rig.device, "desired")
    for body in (b"\xff\xfe not utf-8", b"{not json", b'{"signed": {"kind": "desired"}}'):
        before = len(watcher.events("verify_failed"))
        publisher.put(desired_topic, body)
        watcher.wait("events", lambda e, n=before: len(watcher.events("verify_failed")) > n)
        failed = watcher.events("verify_failed")[-1]
        assert failed["stage"] == "desired" and failed["model"] is None
    publisher.put(rig.topics.manifest("m", 2), b'{"signed": [1, 2], "signature": "x"}')
    publisher.put(desired_topic, rig.signed_desired(2))
    failed = watcher.event("verify_failed", model=ref("m", 2))
    assert failed["stage"] == "manifest"
    assert served_const(agent) == 1.0

    rig.publish(models.add_const(3.0), 3)  # and it still follows new desired states
    rig.assign(3)
    watcher.event("swap_ok", model=ref("m", 3))
    assert served_const(agent) == 3.0


def test_expired_manifest_is_refused_for_good(agent, rig, watcher, publisher):
    rig.publish(models.add_const(2.0), 2, ttl_s=0.5)
    time.sleep(1.0)
    publisher.put(rig.topics.device(rig.device, "desired"), rig.signed_desired(2))
    failed = watcher.event("verify_failed", model=ref("m", 2))
    assert failed["stage"] == "expired"
    assert_still_serving_v1(agent, watcher, "expired")
    # A published version never changes, so it never becomes valid: no retries.
    saved = json.loads((agent.store.root / "desired.json").read_text())
    assert saved["failed"] is True
    time.sleep(3 * agent.timing.retry.max_s)  # several retry periods
    assert len(watcher.events("verify_failed")) == 1


def test_signed_rollback_to_an_installed_version_works_after_its_manifest_expired(
    agent, rig, watcher, publisher
):
    rig.publish(models.add_const(2.0), 2, ttl_s=5)
    rig.assign(2)
    watcher.event("swap_ok", model=ref("m", 2))
    rig.publish(models.add_const(3.0), 3)
    rig.assign(3)
    watcher.event("swap_ok", model=ref("m", 3))
    manifest = Manifest.from_dict(json.loads(agent.store.read_manifest(ModelRef("m", 2)))["signed"])
    time.sleep(max(0.0, manifest.expires - time.time()) + 0.5)
    assert manifest.expired()

    desired = rig.topics.device(rig.device, "desired")
    publisher.put(desired, rig.signed_desired(2, rollback=True))
    watcher.event("swap_ok", model=ref("m", 2), **{"from": ref("m", 3)})
    assert served_const(agent) == 2.0
    progress = [e for e in watcher.events("download_progress") if e["model"] == ref("m", 2)]
    assert len(progress) == 1  # from the store, not downloaded again
    assert watcher.events("verify_failed") == []


def test_model_over_the_size_limit_is_refused_before_download(mosquitto, rig, watcher):
    rig.publish(models.add_const(1.0, pad_bytes=100_000), 1)
    agent = rig.agent(mosquitto.url, max_model_bytes=50_000)
    agent.start()
    try:
        rig.assign(1)
        failed = watcher.event("verify_failed", model=ref("m", 1))
        assert failed["stage"] == "size" and "over this device's limit of 50000" in failed["reason"]
        assert watcher.event("fallback", model=ref("m", 1))["to"] is None
        assert watcher.events("download_progress") == []
        assert agent.serving.current is None
    finally:
        agent.stop()


def test_restart_serves_the_last_good_model_at_once_without_a_broker(agent, rig):
    agent.stop()  # the fixture's stop() again at the end is harmless
    offline = rig.agent(f"mqtt://127.0.0.1:{free_port()}")  # nothing listens there
    offline.start()
    try:
        assert offline.serving.current.version == 1  # when start() returns
        with urllib.request.urlopen(f"{offline.http_url}/healthz", timeout=5) as answer:
            assert json.loads(answer.read())["model"] == ref("m", 1)
        assert served_const(offline) == 1.0
        assert not offline.link.connected
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
            watcher.event("swap_ok", model=ref("m", 1), timeout=30)
            assert served_const(agent) == 7.0
            watcher.wait("state", lambda s: s["current"] == ref("m", 1))
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


def healthz(port: int, timeout: float = 20.0) -> dict:
    """The first answer of a starting agent's /healthz."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                return json.loads(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_sigkill_mid_download_restarts_serving_last_good_and_resumes(
    mosquitto, rig, watcher, publisher, spawn_agent
):
    rig.publish(models.add_const(1.0), 1)
    port = free_port()
    config = rig.write_agent_yaml(mosquitto.url, http={"host": "127.0.0.1", "port": port})
    agent = spawn_agent(config)
    rig.assign(1)
    watcher.event("swap_ok", model=ref("m", 1))

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

    spawn_agent(config)
    assert healthz(port)["model"] == ref("m", 1)  # the last good model, at once
    for i in range(10, len(chunks)):
        publisher.put(rig.topics.chunk("m", 2, i), chunks[i])
    watcher.event("swap_ok", model=ref("m", 2), timeout=30)
    after = [e for e in watcher.events("download_progress") if e["resumed_chunks"]]
    assert after and {e["resumed_chunks"] for e in after} == {10}
    assert healthz(port)["model"] == ref("m", 2)


def test_sigkill_mid_swap_restarts_serving_last_good(mosquitto, rig, watcher, spawn_agent):
    rig.publish(models.add_const(1.0), 1)
    rig.publish(models.lstm(steps=2000, hidden=512), 2, chunk_size=256 * 1024)  # ~1 s smoke test
    port = free_port()
    config = rig.write_agent_yaml(mosquitto.url, http={"host": "127.0.0.1", "port": port})
    agent = spawn_agent(config)
    rig.assign(1)
    watcher.event("swap_ok", model=ref("m", 1))
    rig.assign(2)
    watcher.event("swap_started", model=ref("m", 2), timeout=30)
    agent.kill()
    assert not [e for e in watcher.events("swap_ok") if e["model"] == ref("m", 2)]
    state = json.loads((rig.tmp / "store" / "state.json").read_text())
    assert state["current"] == ref("m", 1) == state["last_good"]

    agent = spawn_agent(config)
    assert healthz(port)["model"] == ref("m", 1)  # the last good model, at once
    # then it resumes the interrupted swap from its store
    watcher.event("swap_ok", model=ref("m", 2), timeout=30, **{"from": ref("m", 1)})

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
        watcher.event("swap_ok", model=ref("m", version))
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
