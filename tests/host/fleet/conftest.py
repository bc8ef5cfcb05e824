"""Fixtures for the fleet tests: the repository's fleet.yaml on a test broker, fresh keys,
an independent paho subscriber, and a compress-style OUTDIR."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import models
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from brokers import Mosquitto, free_port
from paho.mqtt.enums import CallbackAPIVersion

from slimfleet.agent.deployment import DesiredState
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.wire import MAX_PAYLOAD_BYTES, Manifest
from slimfleet.host.fleet.broker import EmbeddedBroker
from slimfleet.host.fleet.config import FleetConfig, load_fleet
from slimfleet.host.fleet.keys import generate_keys

REPO = Path(__file__).resolve().parents[3]
FLEET_YAML = REPO / "fleet.yaml"

Collect = Callable[..., dict[str, mqtt.MQTTMessage]]


MakeFleet = Callable[[str], FleetConfig]


@pytest.fixture(autouse=True)
def _reap_cli_processes() -> Iterator[None]:
    """Whatever a test started with reportdocs.start_slimfleet does not outlive it."""
    from reportdocs import reap_started

    yield
    reap_started()


@pytest.fixture
def fleet_yaml() -> Path:
    """The repository's example fleet.yaml."""
    return FLEET_YAML


@pytest.fixture
def make_fleet(prefix: str, tmp_path: Path) -> MakeFleet:
    """The repository's fleet.yaml on a given broker URL, with this test's prefix and
    fresh keys in tmp_path (the repository's keys/ is never touched)."""

    def make(url: str) -> FleetConfig:
        fleet = load_fleet(FLEET_YAML, broker_url=url)
        private, public = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
        if not private.exists():
            generate_keys(private, public)
        return replace(fleet, prefix=prefix, private_key=private, public_key=public)

    return make


@pytest.fixture
def fleet(mosquitto: Mosquitto, make_fleet: MakeFleet) -> FleetConfig:
    return make_fleet(mosquitto.url)


@pytest.fixture
def collect() -> Collect:
    """``collect(url, topic_filter, count, timeout=15)``: see :func:`collect_retained`."""
    return collect_retained


def collect_retained(
    url: str, topic_filter: str, count: int, timeout: float = 15.0
) -> dict[str, mqtt.MQTTMessage]:
    """Subscribe with a plain paho client and gather ``count`` messages (topic -> last)."""
    settings = BrokerSettings.from_url(url)
    got: dict[str, mqtt.MQTTMessage] = {}
    done = threading.Event()
    # an explicit id: amqtt gives every client with an empty id the same session
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"collect-{uuid.uuid4().hex}"
    )

    def on_connect(c, userdata, flags, rc, props):
        c.subscribe(topic_filter, qos=1)

    def on_message(c, userdata, msg):
        got[msg.topic] = msg
        if len(got) >= count:
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def fetch_model(fleet: FleetConfig, name: str, version: int) -> tuple[Manifest, bytes, dict]:
    """Read manifest and chunks as a device would, verifying signature and every hash.

    Returns the manifest, the reassembled bytes and the raw manifest messages.
    """
    topics, url = fleet.topics, fleet.broker.url
    manifest_topic = topics.manifest(name, version)
    got = collect_retained(url, manifest_topic, 1)
    assert got[manifest_topic].retain
    manifest = Manifest.from_dict(fleet.verifier().verify(got[manifest_topic].payload, "manifest"))
    chunk_filter = f"{fleet.prefix}/models/{name}/{version}/chunk/+"
    chunks = collect_retained(url, chunk_filter, manifest.chunk_count)
    assert len(chunks) == manifest.chunk_count
    parts = []
    for i, expected in enumerate(manifest.chunks):
        message = chunks[topics.chunk(name, version, i)]
        assert message.retain
        assert len(message.payload) <= manifest.chunk_size <= MAX_PAYLOAD_BYTES
        assert hashlib.sha256(message.payload).hexdigest() == expected
        parts.append(message.payload)
    data = b"".join(parts)
    assert len(data) == manifest.size
    assert hashlib.sha256(data).hexdigest() == manifest.sha256
    return manifest, data, got


def read_desired(
    fleet: FleetConfig, devices: list[str], timeout: float = 5.0
) -> dict[str, DesiredState]:
    """The retained, signature-checked desired state of the fleet's devices; waits up to
    ``timeout`` for ``len(devices)`` of them."""
    got = collect_retained(
        fleet.broker.url, fleet.topics.all_devices("desired"), len(devices), timeout=timeout
    )
    out = {}
    for topic, message in got.items():
        assert message.retain
        device, _ = fleet.topics.parse_device_topic(topic)
        out[device] = DesiredState.from_dict(fleet.verifier().verify(message.payload, topic))
    return out


@pytest.fixture
def fetch() -> Callable[[FleetConfig, str, int], tuple[Manifest, bytes, dict]]:
    return fetch_model


@pytest.fixture
def desired() -> Callable[..., dict[str, DesiredState]]:
    return read_desired


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    """What 'slimfleet compress' leaves behind: model.onnx, report.json, sample.npz."""
    out = tmp_path / "out"
    models.save(models.conv_bn_net(), out / "model.onnx")
    summary = {"size_ratio": 0.5, "latency_ratio": 0.8, "passes": ["simplify", "fuse"]}
    (out / "report.json").write_text(json.dumps({"summary": summary, "candidates": []}))
    sample = np.random.default_rng(1).normal(size=(1, 3, 32, 32)).astype(np.float32)
    np.savez(out / "sample.npz", input=sample)
    return out


# mosquitto 2.1's default; the installed 2.0 accepts anything unless told.
MQTT_MAX_PACKET = 2 * 1024 * 1024


@pytest.fixture
def strict_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto that, like 2.1 by default, drops clients sending packets over 2 MB."""
    broker = Mosquitto(tmp_path / "strict-mosquitto")
    broker.conf.write_text(broker.conf.read_text() + f"max_packet_size {MQTT_MAX_PACKET}\n")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    """The embedded amqtt broker on a free port."""
    with EmbeddedBroker("127.0.0.1", free_port()) as broker:
        yield broker
