"""The agent's MQTT link against a real mosquitto, over MQTT 3.1.1 and 5."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from brokers import Mosquitto, free_port

from slimfleet.agent.link import STATUS_OFFLINE, STATUS_ONLINE, Backoff, Link, Subscription
from slimfleet.agent.mqtt import BrokerSettings

PROTOCOLS = ["3.1.1", "5"]
FAST = Backoff(initial_s=0.1, max_s=0.5)


def settings(broker: Mosquitto, protocol: str = "3.1.1") -> BrokerSettings:
    return BrokerSettings("127.0.0.1", broker.port, protocol=protocol, keepalive=5)


def make_link(broker: Mosquitto, client_id: str, protocol: str = "3.1.1", **kw) -> Link:
    return Link(settings(broker, protocol), client_id, backoff=FAST, **kw)


def wait_for(sub: Subscription, payload: bytes, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = sub.get(timeout=0.2)
        if msg is not None and msg.payload == payload:
            return
    raise AssertionError(f"no message {payload!r} on {sorted(sub.filters)}")


@pytest.fixture
def watcher(mosquitto: Mosquitto, prefix: str):
    link = make_link(mosquitto, f"watch-{prefix}")
    link.start()
    assert link.wait_connected(10)
    yield link
    link.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_status_online_then_offline_on_stop(mosquitto, prefix, watcher, protocol):
    status = f"{prefix}/{protocol}/status"
    sub = watcher.subscribe([status])
    link = make_link(mosquitto, f"dev-{prefix}", protocol, status_topic=status)
    link.start()
    assert link.wait_connected(10)
    wait_for(sub, STATUS_ONLINE)
    link.stop()
    wait_for(sub, STATUS_OFFLINE)
    # retained: a newcomer reads "offline" too
    late = watcher.subscribe([status])
    msg = late.get(timeout=5)
    assert msg is not None and msg.retain and msg.payload == STATUS_OFFLINE


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_and_live_messages_reach_the_subscription(mosquitto, prefix, watcher, protocol):
    watcher.publish(f"{prefix}/a", b"retained", retain=True)
    link = make_link(mosquitto, f"dev-{prefix}", protocol)
    link.start()
    try:
        with link.subscribe([f"{prefix}/#"]) as sub:
            msg = sub.get(timeout=10)
            assert msg is not None and (msg.topic, msg.payload, msg.retain) == (
                f"{prefix}/a",
                b"retained",
                True,
            )
            watcher.publish(f"{prefix}/b", b"live")
            wait_for(sub, b"live")
        # closed: nothing more arrives
        watcher.publish(f"{prefix}/c", b"after close")
        assert sub.get(timeout=0.5) is None
    finally:
        link.stop()


def test_last_will_marks_a_killed_device_offline(mosquitto, prefix, watcher, tmp_path: Path):
    status = f"{prefix}/status"
    sub = watcher.subscribe([status])
    script = (
        "import sys, time\n"
        "from slimfleet.agent.link import Link\n"
        "from slimfleet.agent.mqtt import BrokerSettings\n"
        f"link = Link(BrokerSettings('127.0.0.1', {mosquitto.port}), 'dev-{prefix}',"
        f" status_topic={status!r})\n"
        "link.start()\n"
        "assert link.wait_connected(10)\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        wait_for(sub, STATUS_ONLINE)
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(sub, STATUS_OFFLINE)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reconnects_and_resubscribes_after_broker_restart(own_mosquitto, prefix, protocol):
    link = make_link(own_mosquitto, f"dev-{prefix}", protocol)
    sub = link.subscribe([f"{prefix}/cmd"])
    link.start()
    assert link.wait_connected(10)
    own_mosquitto.restart(down_s=0.5)
    deadline = time.monotonic() + 15
    while link.connects < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert link.connects == 2
    other = make_link(own_mosquitto, f"other-{prefix}", protocol)
    other.start()
    try:
        assert other.wait_connected(10)
        other.publish(f"{prefix}/cmd", b"after restart")
        wait_for(sub, b"after restart")
    finally:
        other.stop()
        link.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_session_keeps_messages_sent_while_away(mosquitto, prefix, watcher, protocol):
    topic = f"{prefix}/queued"
    first = make_link(mosquitto, f"dev-{prefix}", protocol)
    first.subscribe([topic])
    first.start()
    assert first.wait_connected(10)
    time.sleep(0.2)  # the SUBSCRIBE reaches the broker
    first.stop()
    watcher.publish(topic, b"sent while away")  # not retained: only the session keeps it
    time.sleep(0.2)
    second = make_link(mosquitto, f"dev-{prefix}", protocol)
    sub = second.subscribe([topic])
    second.start()
    try:
        wait_for(sub, b"sent while away")
    finally:
        second.stop()


def test_starts_without_a_broker_and_connects_when_it_appears(tmp_path: Path, prefix):
    broker = Mosquitto(tmp_path / "late", port=free_port())
    link = make_link(broker, f"dev-{prefix}")
    link.start()
    try:
        assert not link.wait_connected(0.5)
        assert link.last_error and "cannot connect" in link.last_error
        assert link.publish(f"{prefix}/x", b"queued while offline")  # QoS 1 waits
        broker.start()
        assert link.wait_connected(10)
    finally:
        link.stop()
        broker.stop()


def test_many_threads_publish_concurrently(mosquitto, prefix, watcher):
    topic = f"{prefix}/load"
    sub = watcher.subscribe([topic])
    time.sleep(0.2)
    link = make_link(mosquitto, f"dev-{prefix}")
    link.start()
    assert link.wait_connected(10)
    per_thread, threads = 100, 4
    body = bytes(range(256)) * 40  # 10 KB

    def send(t: int) -> None:
        for i in range(per_thread):
            link.publish(topic, f"{t}:{i}:".encode() + body)

    workers = [threading.Thread(target=send, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seen = set()
    deadline = time.monotonic() + 20
    while len(seen) < per_thread * threads and time.monotonic() < deadline:
        msg = sub.get(timeout=0.5)
        if msg is not None:
            head, _, rest = msg.payload.partition(b":")
            index, _, data = rest.partition(b":")
            assert data == body  # no interleaved writes
            seen.add((int(head), int(index)))
    link.stop()
    assert len(seen) == per_thread * threads


def test_backoff_grows_with_jitter_and_is_capped():
    backoff = Backoff(initial_s=1.0, max_s=8.0)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, not a constant


def test_backoff_survives_any_number_of_attempts():
    backoff = Backoff(initial_s=0.5, max_s=30.0)
    for attempt in (1023, 1024, 5000, 10**9):
        assert 15.0 <= backoff.delay(attempt) <= 30.0


def test_an_unexpected_error_in_the_loop_is_logged_and_retried(mosquitto, prefix, caplog):
    # paho raises ValueError for this filter when the link subscribes on connect.
    link = make_link(mosquitto, f"dev-{prefix}")
    link.subscribe(["bad/#/filter"])
    link.start()
    try:
        deadline = time.monotonic() + 20
        while link.connects < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.connects >= 3, link.last_error  # kept reconnecting after the error
        assert link._thread is not None and link._thread.is_alive()
        assert "Invalid subscription filter" in (link.last_error or "")
        assert "Invalid subscription filter" in caplog.text
    finally:
        link.stop()
