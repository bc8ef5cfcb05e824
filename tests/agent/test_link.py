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
from hostile_link import receive_in_child

from slimfleet.agent.inbox import (
    DOCUMENT_LIMIT,
    DROP_QUEUE_FULL,
    DROP_TOO_LARGE,
    MANIFEST_LIMIT,
    MAX_PACKET_BYTES,
    DropLog,
    Dropped,
    chunk_limit,
)
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
    # the broker holds it once the watcher reads it back (its publish goes first on the
    # same connection); else the link could subscribe first and get it live, unretained
    with watcher.subscribe([f"{prefix}/a"]) as check:
        wait_for(check, b"retained")
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


# -- limits before parsing (issue 8 item 2) -----------------------------------------------


def test_a_message_over_the_subscription_limit_is_dropped_with_a_callback(
    mosquitto, prefix, watcher
):
    drops: list[Dropped] = []
    link = make_link(mosquitto, f"dev-{prefix}", on_drop=drops.append)
    desired, chunk = f"{prefix}/desired", f"{prefix}/chunk/0"
    small = link.subscribe([desired], max_bytes=DOCUMENT_LIMIT)
    big = link.subscribe([chunk], max_bytes=chunk_limit(200_000))
    link.start()
    try:
        assert link.wait_connected(10)
        time.sleep(0.2)
        watcher.publish(desired, b"x" * (DOCUMENT_LIMIT + 1))
        watcher.publish(chunk, b"y" * 200_000)  # within its own subscription's limit
        watcher.publish(desired, b"fits")
        wait_for(small, b"fits")
        wait_for(big, b"y" * 200_000)
        assert drops == [Dropped(desired, DOCUMENT_LIMIT + 1, DOCUMENT_LIMIT, DROP_TOO_LARGE)]
        assert link.dropped[DROP_TOO_LARGE] == 1
    finally:
        link.stop()


def test_a_full_subscription_queue_drops_and_counts(mosquitto, prefix, watcher):
    drops: list[Dropped] = []
    link = make_link(mosquitto, f"dev-{prefix}", on_drop=drops.append)
    topic = f"{prefix}/flood"
    sub = link.subscribe([topic], max_messages=5)
    link.start()
    try:
        assert link.wait_connected(10)
        time.sleep(0.2)
        for i in range(12):
            watcher.publish(topic, str(i).encode())
        deadline = time.monotonic() + 10
        while link.dropped[DROP_QUEUE_FULL] < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.dropped[DROP_QUEUE_FULL] == 7
        assert {d.reason for d in drops} == {DROP_QUEUE_FULL}
        assert [sub.get(timeout=1).payload for _ in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
        assert sub.get(timeout=0.3) is None
        watcher.publish(topic, b"room again")
        wait_for(sub, b"room again")
    finally:
        link.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_state_subscription_fetches_the_retained_message_a_flood_pushed_out(
    mosquitto, prefix, watcher, protocol
):
    # a flood of junk on devices/<id>/desired filled the agent's queue, the valid retained
    # desired state that arrived meanwhile was dropped, and the device never saw it again
    link = make_link(mosquitto, f"dev-{prefix}", protocol)
    topics = {"state": f"{prefix}/{protocol}/desired", "plain": f"{prefix}/{protocol}/other"}
    subs = {
        "state": link.subscribe([topics["state"]], max_messages=2, resync=True),
        "plain": link.subscribe([topics["plain"]], max_messages=2),
    }
    link.start()
    try:
        assert link.wait_connected(10)
        time.sleep(0.2)
        for topic in topics.values():
            watcher.publish(topic, b"junk 1")
            watcher.publish(topic, b"junk 2")
            watcher.publish(topic, b"valid", retain=True)  # dropped: the queue is full
        deadline = time.monotonic() + 10
        while link.dropped[DROP_QUEUE_FULL] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        for sub in subs.values():
            assert [sub.get(timeout=1).payload for _ in range(2)] == [b"junk 1", b"junk 2"]
        wait_for(subs["state"], b"valid")  # drained: re-subscribed, the broker sent it again
        assert subs["plain"].get(timeout=1) is None  # without resync it is gone
    finally:
        link.stop()


def test_a_retained_state_paho_refused_is_sent_again(mosquitto, prefix, watcher, monkeypatch):
    # after a flood of events filled paho's outgoing queue, the agent's state publish was
    # refused and never retried: the broker kept the state from before the flood
    link = make_link(mosquitto, f"dev-{prefix}")
    topic = f"{prefix}/state"
    seen = watcher.subscribe([topic])
    link.start()
    try:
        assert link.wait_connected(10)
        refused: list[str] = []
        real = link.publish

        def full_once(topic_, payload, **kw):
            if not refused:
                refused.append(topic_)
                return False  # what paho's MQTT_ERR_QUEUE_SIZE looks like from here
            return real(topic_, payload, **kw)

        monkeypatch.setattr(link, "publish", full_once)
        link.set_retained(topic, b"after the flood")
        assert refused == [topic]
        wait_for(seen, b"after the flood")
    finally:
        link.stop()


def test_the_queued_bytes_bound_drops_what_would_exceed_it(mosquitto, prefix, watcher):
    link = make_link(mosquitto, f"dev-{prefix}")
    topic = f"{prefix}/bytes"
    sub = link.subscribe([topic], max_bytes=1000, max_queued_bytes=2500)
    link.start()
    try:
        assert link.wait_connected(10)
        time.sleep(0.2)
        for _ in range(3):
            watcher.publish(topic, b"z" * 1000)
        watcher.publish(topic, b"end")
        deadline = time.monotonic() + 10
        while link.dropped[DROP_QUEUE_FULL] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = [sub.get(timeout=1) for _ in range(3)]
        assert [len(m.payload) for m in got if m] == [1000, 1000, 3]
        assert link.dropped[DROP_QUEUE_FULL] == 1
    finally:
        link.stop()


HOSTILE_BYTES = 40 * 1024 * 1024


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_hostile_40mb_message_is_dropped_and_memory_stays_bounded(
    mosquitto, prefix, watcher, protocol
):
    """Over 5 the broker never delivers it (Maximum Packet Size); over 3.1.1 paho reads
    it and the link drops it unqueued. Either way the link keeps working."""
    topic = f"{prefix}/devices/d/desired"
    result = receive_in_child(mosquitto.port, protocol, topic, prefix, watcher, HOSTILE_BYTES)
    assert result["payloads"] == ["after"]  # still responsive, hostile message never queued
    assert result["connects"] == 1
    if protocol == "5":
        assert result["drops"] == []  # the broker discarded it
    else:
        assert result["drops"] == [HOSTILE_BYTES]  # read in pieces and dropped
    # Loose bounds (the numbers are in the README): paho reading the packet whole would
    # peak at 3x the message, a queued copy would stay.
    assert result["peak_growth"] < 16 * 1024 * 1024, result
    assert result["rss_growth"] < 16 * 1024 * 1024, result


def test_mqtt311_drops_an_oversized_qos1_message_unread_and_acknowledges_it(
    mosquitto, prefix, watcher
):
    drops: list[Dropped] = []
    topic = f"{prefix}/desired"
    link = make_link(mosquitto, f"dev-{prefix}", on_drop=drops.append)
    sub = link.subscribe([topic], max_bytes=DOCUMENT_LIMIT)
    link.start()
    try:
        assert link.wait_connected(10)
        time.sleep(0.2)
        watcher.publish(topic, b"o" * (MAX_PACKET_BYTES + 1), qos=1)
        watcher.publish(topic, b"next", qos=1)  # the stream stays in step after the drop
        wait_for(sub, b"next")
        assert drops == [Dropped(topic, MAX_PACKET_BYTES + 1, MAX_PACKET_BYTES, DROP_TOO_LARGE)]
    finally:
        link.stop()
    # Acknowledged: the persistent session does not deliver it again on reconnect.
    again: list[Dropped] = []
    second = make_link(mosquitto, f"dev-{prefix}", on_drop=again.append)
    sub = second.subscribe([topic], max_bytes=DOCUMENT_LIMIT)
    second.start()
    try:
        assert second.wait_connected(10)
        watcher.publish(topic, b"after reconnect")
        wait_for(sub, b"after reconnect")
        assert again == []
    finally:
        second.stop()


def test_mqtt5_asks_the_broker_for_small_packets_yet_takes_a_manifest_sized_one(
    mosquitto, prefix, watcher
):
    drops: list[Dropped] = []
    link = make_link(mosquitto, f"dev-{prefix}", "5", on_drop=drops.append)
    topic = f"{prefix}/manifest"
    sub = link.subscribe([topic], max_bytes=MANIFEST_LIMIT)
    link.start()
    try:
        assert link.wait_connected(10)
        time.sleep(0.2)
        watcher.publish(topic, b"m" * MANIFEST_LIMIT)
        watcher.publish(topic, b"m" * (MAX_PACKET_BYTES + 1))  # the broker discards it
        watcher.publish(topic, b"after")
        wait_for(sub, b"m" * MANIFEST_LIMIT)
        wait_for(sub, b"after")
        assert drops == [] and link.connects == 1
    finally:
        link.stop()


def test_subscription_bounds_are_validated(mosquitto, prefix):
    link = make_link(mosquitto, f"dev-{prefix}")
    with pytest.raises(ValueError, match="max_messages"):
        link.subscribe([f"{prefix}/x"], max_messages=0)


def test_drop_reports_are_throttled_per_reason_and_carry_what_they_stand_for():
    now = [100.0]
    drops = DropLog(interval_s=1.0, clock=lambda: now[0])
    big = Dropped("t/a", 10, 5, DROP_TOO_LARGE)
    full = Dropped("t/b", 1, 256, DROP_QUEUE_FULL)
    assert drops.record(big) == big  # the first one is reported at once
    assert drops.record(full) == full  # another reason has its own budget
    assert [drops.record(big) for _ in range(3)] == [None, None, None]
    now[0] += 1.0
    assert drops.record(big) == Dropped("t/a", 10, 5, DROP_TOO_LARGE, suppressed=3)
    assert drops.record(big) is None
    assert drops.counts == {DROP_TOO_LARGE: 6, DROP_QUEUE_FULL: 1}
