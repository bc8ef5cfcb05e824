"""Schema-2 report documents shaped like the contract at the end of agent/wire.py, and a
publisher that puts them on a real broker, for tests of what the host reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from slimfleet.agent.mqtt import BrokerSettings

REPO = Path(__file__).resolve().parents[1]
RUN = "from slimfleet.host.cli import main; main()"
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "SLIMFLEET_BROKER"}
OCR3 = {"name": "ocr", "version": 3}
OCR2 = {"name": "ocr", "version": 2}


def state_doc(
    device: str,
    *,
    deployment: dict[str, list[dict]] | None = None,
    desired: dict[str, Any] | None = None,
    started: float = 1_700_000_000.0,
    status: str = "serving",
    ts: float | None = None,
) -> dict[str, Any]:
    deployment = {"main": [OCR3]} if deployment is None else deployment
    doc: dict[str, Any] = {
        "schema": 2,
        "device": device,
        "ts": time.time() if ts is None else ts,
        "started": started,
        "status": status,
        "deployment": deployment,
        "last_good": deployment,
        "previous": None,
        "desired": None,
        "floor": 0,
    }
    if desired is not None:
        seq = desired.get("seq", 1)
        doc["desired"] = {
            "seq": seq,
            "issued": time.time() - 5,
            "expires": time.time() + 3600,
            "rollback": False,
            "deployment": deployment,
            "outcome": "serving",
            "stage": None,
            "reason": None,
            **desired,
        }
        doc["floor"] = seq
    return doc


def slot_doc(
    requests: int = 120,
    escalations: int = 0,
    tiers: int = 1,
    p50: float = 4.0,
    p95: float = 6.0,
    errors: int = 1,
) -> dict[str, Any]:
    """One slot's interval; ``tiers`` > 1 makes an ocr@3 -> ocr@2 chain."""
    doc: dict[str, Any] = {
        "model": OCR3,
        "requests": requests,
        "errors": errors,
        "client_errors": 2,
        "escalations": escalations,
        "throughput_rps": requests / 10.0,
        "latency_ms": {"p50": p50, "p95": p95, "p99": p95 * 1.5},
        "tiers": {"ocr@3": {"runs": requests, "latency_ms": {"p50": p50, "p95": p95}}},
    }
    if tiers > 1:
        doc["tiers"]["ocr@2"] = {"runs": escalations or requests // 4, "latency_ms": None}
    return doc


def telemetry_doc(
    device: str,
    *,
    slots: dict[str, dict[str, Any]] | None = None,
    started: float = 1_700_000_000.0,
    rss_bytes: int = 50_000_000,
    ts: float | None = None,
) -> dict[str, Any]:
    slots = {"main": {}} if slots is None else slots
    return {
        "schema": 2,
        "device": device,
        "ts": time.time() if ts is None else ts,
        "started": started,
        "uptime_s": 100.0,
        "interval_s": 10.0,
        "rss_bytes": rss_bytes,
        "cpu_percent": 12.5,
        "slots": {slot: slot_doc(**kw) for slot, kw in slots.items()},
    }


def event_doc(device: str, kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "ts": time.time(),
        "device": device,
        "slot": "main",
        "model": OCR3,
        "seq": 1,
        **fields,
    }


def publish(url: str, topic: str, payload: Any, *, retain: bool = False) -> None:
    """Publish one message at QoS 1 and wait for its PUBACK (dicts are sent as JSON)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    settings = BrokerSettings.from_url(url)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex}"
    )
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        client.publish(topic, body, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


class Publisher:
    """A background client that publishes ``messages()`` every ``period`` seconds until
    stopped: live (non-retained) telemetry and events for a command that is waiting."""

    def __init__(self, url: str, messages, period: float = 0.2) -> None:
        settings = BrokerSettings.from_url(url)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"live-{uuid.uuid4().hex}"
        )
        self.client.connect(settings.host, settings.port)
        self.messages, self.period = messages, period
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(self.period):
            for topic, doc in self.messages():
                body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
                self.client.publish(topic, body, qos=0)

    def __enter__(self) -> Publisher:
        self.client.loop_start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()
        self.client.disconnect()
        self.client.loop_stop()


def write_fleet_file(tmp_path: Path, prefix: str, url: str) -> Path:
    """The repository's fleet.yaml (cam-01, cam-02, gate-01; groups canary, all) with this
    test's prefix and broker, next to fresh keys."""
    from slimfleet.host.fleet.config import load_fleet
    from slimfleet.host.fleet.keys import generate_keys

    text = (REPO / "fleet.yaml").read_text()
    text = text.replace("prefix: slimfleet/demo", f"prefix: {prefix}")
    text = text.replace("url: mqtt://127.0.0.1:1883", f"url: {url}")
    path = tmp_path / "fleet.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    fleet = load_fleet(path)
    generate_keys(fleet.private_key, fleet.public_key)
    return path


def slimfleet(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the slimfleet CLI in a subprocess, without $SLIMFLEET_BROKER."""
    return subprocess.run(
        [sys.executable, "-c", RUN, *map(str, args)],
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
        timeout=timeout,
    )


STARTED: list[subprocess.Popen[str]] = []
"""CLI processes :func:`start_slimfleet` started; :func:`reap_started` kills what is left."""


def start_slimfleet(*args: Any) -> subprocess.Popen[str]:
    """Start the slimfleet CLI (a long-running command); killed after the test if alive."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLEAN_ENV,
    )
    STARTED.append(proc)
    return proc


def reap_started() -> None:
    """Kill every started CLI process still running (a test that failed before stopping
    it must not leave a follower or an exporter behind for the rest of the session)."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]
