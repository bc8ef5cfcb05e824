"""The agent end to end against a real mosquitto: publish, assign, swap, refuse, fall back."""

from __future__ import annotations

import models
import numpy as np
import pytest

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
        state = watcher.wait("state", lambda s: s["current"] == ref("m", 2))
        assert state["previous"] == ref("m", 1) and state["last_good"] == ref("m", 2)
        assert agent.state.previous.version == 1  # persisted too
    finally:
        agent.stop()
    watcher.wait("status", lambda s: s == "offline")
