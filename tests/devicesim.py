"""A device simulator for host-side deploy tests: answers desired states as the schema-2
wire contract (agent/wire.py) says an agent does, without being an agent.

It verifies each desired state with the fleet's public key, applies the replay rule
(seq above the floor), asks ``decide`` whether to serve or refuse, and publishes the
retained ``devices/<id>/state`` document. With ``p95_ms`` it also publishes telemetry
(per slot p95 latency) every ``telemetry_s``. The real agents are tested end to end at
merge; what is real here is the broker, the signatures and the documents' shape.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from slimfleet.agent.deployment import Deployment, DesiredState
from slimfleet.agent.errors import VerifyError
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.host.fleet.config import FleetConfig

# (device, desired) -> ("serving", None, None) or ("refused", stage, reason)
Decide = Callable[[str, DesiredState], tuple[str, str | None, str | None]]
Latency = Callable[[str, dict[str, list[dict[str, Any]]]], float]


def serve_everything(device: str, desired: DesiredState) -> tuple[str, None, None]:
    return "serving", None, None


def _refs(deployment: Deployment) -> dict[str, list[dict[str, Any]]]:
    return {slot: [m.to_dict() for m in spec.models] for slot, spec in deployment.items()}


class DeviceSimulator:
    """Simulated devices on one paho client; use as a context manager.

    ``state[device]`` holds the last state document published for it (guarded by
    ``lock``, written by the paho thread, read by tests).
    """

    def __init__(
        self,
        fleet: FleetConfig,
        devices: list[str],
        decide: Decide = serve_everything,
        *,
        p95_ms: Latency | None = None,
        telemetry_s: float = 0.2,
    ) -> None:
        self.fleet = fleet
        self.topics = fleet.topics
        self.devices = devices
        self.decide = decide
        self.p95_ms = p95_ms
        self.telemetry_s = telemetry_s
        self.verifier = fleet.verifier()
        self.lock = threading.Lock()
        self.state: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, list[int]] = {d: [] for d in devices}
        self.started = time.time()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        settings = BrokerSettings.from_url(fleet.broker.url)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"devicesim-{uuid.uuid4().hex[:8]}",
        )
        self.client.on_message = self._on_message
        self.client.connect(settings.host, settings.port)

    def __enter__(self) -> DeviceSimulator:
        self.client.loop_start()
        for device in self.devices:
            self.client.subscribe(self.topics.device(device, "desired"), qos=1)
        if self.p95_ms is not None:
            self._ticker = threading.Thread(target=self._telemetry, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.client.disconnect()
        self.client.loop_stop()

    def publish_state(self, device: str, doc: dict[str, Any]) -> None:
        with self.lock:
            self.state[device] = doc
        topic = self.topics.device(device, "state")
        self.client.publish(topic, json.dumps(doc), qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        parsed = self.topics.parse_device_topic(message.topic)
        if parsed is None or not message.payload:
            return
        device = parsed[0]
        try:
            desired = DesiredState.from_dict(self.verifier.verify(message.payload, message.topic))
        except VerifyError:
            return
        with self.lock:
            self.seen[device].append(desired.seq)
            old = self.state.get(device) or {"deployment": {}, "previous": None, "floor": 0}
        summary = {
            "seq": desired.seq,
            "issued": desired.issued,
            "expires": desired.expires,
            "rollback": desired.rollback,
            "deployment": _refs(desired.deployment),
        }
        if desired.seq <= old["floor"]:
            outcome, stage, reason = "refused", "replay", f"seq {desired.seq} <= {old['floor']}"
        else:
            outcome, stage, reason = self.decide(device, desired)
        serving = outcome == "serving"
        doc = {
            "schema": 2,
            "device": device,
            "ts": time.time(),
            "started": self.started,
            "status": "serving" if serving else "failed",
            "deployment": summary["deployment"] if serving else old["deployment"],
            "last_good": None,
            "previous": old["deployment"] if serving else old["previous"],
            "desired": summary | {"outcome": outcome, "stage": stage, "reason": reason},
            # the contract: a replayed or future-dated desired state does not move the floor
            "floor": old["floor"] if stage in ("replay", "skew") else desired.seq,
        }
        # paho's network thread must not block on its own PUBACK: publish without waiting
        with self.lock:
            self.state[device] = doc
        self.client.publish(self.topics.device(device, "state"), json.dumps(doc), 1, True)

    def _telemetry(self) -> None:
        assert self.p95_ms is not None
        while not self._stop.wait(self.telemetry_s):
            with self.lock:
                states = dict(self.state)
            for device, doc in states.items():
                slots = {
                    slot: {
                        "model": tiers[0] if tiers else None,
                        "requests": 100,
                        "errors": 0,
                        "latency_ms": {"p50": 1.0, "p95": self.p95_ms(device, doc["deployment"])},
                    }
                    for slot, tiers in doc["deployment"].items()
                }
                body = {"schema": 2, "device": device, "ts": time.time(), "started": self.started}
                body["slots"] = slots
                self.client.publish(self.topics.device(device, "telemetry"), json.dumps(body))
