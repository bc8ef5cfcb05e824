"""The agent's per-topic message limits, against a real mosquitto and a real agent: a
hostile message on the desired-state or a manifest topic is dropped before it is
decoded, reported as a ``message_dropped`` event, and the agent keeps serving and then
follows a valid desired state."""

from __future__ import annotations

import json

import models
import numpy as np
import pytest

from slimfleet.agent.inbox import DOCUMENT_LIMIT, DROP_TOO_LARGE, MANIFEST_LIMIT, Dropped
from slimfleet.agent.outbox import MAX_PENDING_DROPS, Outbox
from slimfleet.agent.telemetry import Telemetry

X = np.arange(4, dtype=np.float32).reshape(1, 4)
HUGE = 20 * 1024 * 1024 + 1  # over the 2 MiB packet limit: never held in memory


def main(version: int) -> dict:
    return {"main": [{"name": "m", "version": version}]}


def served_const(agent) -> float:
    return float((agent.infer({"x": X})["y"] - X)[0, 0])


@pytest.fixture
def serving(mosquitto, rig, watcher, request):
    """A started agent (MQTT ``request.param``, default 3.1.1) serving m@1 (add 1.0)."""
    rig.publish(models.add_const(1.0), 1)
    agent = rig.agent(mosquitto.url, getattr(request, "param", "3.1.1"))
    agent.start()
    rig.assign(1)
    watcher.event("swap_ok", deployment=main(1))
    yield agent
    agent.stop()


@pytest.mark.parametrize(
    ("serving", "size", "limit"),
    [("3.1.1", HUGE, None), ("5", DOCUMENT_LIMIT + 1, DOCUMENT_LIMIT)],
    indirect=["serving"],
)
def test_big_desired_dropped_then_next_applied(serving, rig, watcher, publisher, size, limit):
    topic = rig.topics.device(rig.device, "desired")
    publisher.put(topic, b"{" * size, retain=False)
    event = watcher.event("message_dropped", topic=topic)
    assert event["reason"] == DROP_TOO_LARGE and event["size"] == size and event["count"] >= 1
    if limit is not None:  # MQTT 5: the broker delivered it; the desired topic's limit held
        assert event["limit"] == limit
    assert served_const(serving) == 1.0  # still serving, nothing refused or lost
    assert not watcher.events("desired_refused")

    rig.publish(models.add_const(2.0), 2)
    rig.assign(2)
    watcher.event("swap_ok", deployment=main(2))
    assert served_const(serving) == 2.0
    assert serving.link.dropped[DROP_TOO_LARGE] >= 1


@pytest.mark.parametrize(
    ("serving", "size"), [("3.1.1", HUGE), ("5", MANIFEST_LIMIT + 1)], indirect=["serving"]
)
def test_big_manifest_dropped_then_real_one_installed(serving, rig, watcher, publisher, size):
    manifest_topic = rig.topics.manifest("m", 2)
    publisher.put(manifest_topic, b"[" * size)  # retained where m@2's manifest belongs
    rig.assign(2)
    event = watcher.event("message_dropped", topic=manifest_topic)
    assert event["reason"] == DROP_TOO_LARGE and event["size"] == size
    assert served_const(serving) == 1.0
    # The update is retried (transient), not refused; the host then publishes m@2 for real.
    watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "download")
    assert not watcher.events("desired_refused")
    publisher.put(manifest_topic, b"")  # clear the garbage the host's publish would meet
    rig.publish(models.add_const(2.0), 2)
    watcher.event("swap_ok", deployment=main(2), timeout=30)
    assert served_const(serving) == 2.0


def test_drop_reports_wait_in_a_bounded_queue_and_become_events():
    published: list[tuple[str, dict, int]] = []
    outbox = Outbox(
        "dev",
        Telemetry("dev"),
        publish=lambda topic, payload, qos: published.append((topic, json.loads(payload), qos)),
        events_topic="p/devices/dev/events",
        telemetry_topic="p/devices/dev/telemetry",
        seq=lambda: 7,
    )
    for i in range(MAX_PENDING_DROPS + 10):  # the link thread only appends: never blocks
        outbox.dropped(Dropped(f"t/{i}", 100 + i, 10, DROP_TOO_LARGE, suppressed=i))
    assert not published
    outbox.report_drops()
    assert len(published) == MAX_PENDING_DROPS  # the oldest reports were forgotten
    topic, event, qos = published[-1]
    assert topic == "p/devices/dev/events" and qos == 1
    last = MAX_PENDING_DROPS + 9
    assert event["type"] == "message_dropped" and event["topic"] == f"t/{last}"
    assert (event["size"], event["limit"], event["count"], event["seq"]) == (
        100 + last,
        10,
        last + 1,
        7,
    )
    assert event["device"] == "dev" and event["reason"] == DROP_TOO_LARGE
