"""Helpers for the agent's MQTT tests: brokers, a publisher, a fleet with one device, a watcher."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import models
import onnx
import pytest
import yaml
from brokers import Mosquitto

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent, Timing
from slimfleet.agent.link import Backoff, Link
from slimfleet.agent.mqtt import BrokerSettings, make_client
from slimfleet.agent.wire import Desired, Topics
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import assign, publish_model


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """Like the shared fixture, but its retained messages really survive a restart.

    Started as root, mosquitto drops to the ``mosquitto`` user, which cannot write
    into pytest's 0700 tmp dirs: persistence (and the log) silently fail. ``user``
    set to the current user keeps it as is (and does nothing when not root).
    """
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.conf.write_text(broker.conf.read_text() + f"user {getpass.getuser()}\n")
    broker.start()
    yield broker
    broker.stop()


class Publisher:
    """A plain paho client that publishes retained QoS 1 messages and waits for PUBACK."""

    def __init__(self, broker: Mosquitto, client_id: str) -> None:
        self.client = make_client(BrokerSettings("127.0.0.1", broker.port), client_id)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def put(self, topic: str, payload: bytes, retain: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"broker did not acknowledge {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher_for(prefix: str) -> Iterator[Callable[[Mosquitto], Publisher]]:
    """A factory of publishers connected to a given broker, closed after the test."""
    made: list[Publisher] = []

    def make(broker: Mosquitto) -> Publisher:
        made.append(Publisher(broker, f"pub{len(made)}-{prefix}"))
        return made[-1]

    yield make
    for pub in made:
        pub.close()


@pytest.fixture
def publisher(mosquitto: Mosquitto, publisher_for: Callable[[Mosquitto], Publisher]) -> Publisher:
    return publisher_for(mosquitto)


# -- a fleet and one device on a broker ---------------------------------------------

REPO = Path(__file__).resolve().parents[2]
FAST = Timing(
    manifest_timeout_s=5.0,
    chunk_timeout_s=5.0,
    retry=Backoff(initial_s=0.3, max_s=1.0),
    link=Backoff(initial_s=0.1, max_s=0.5),
)


class Rig:
    """The repository's fleet.yaml (fresh keys, this test's prefix) and one device of it.

    ``publish``/``assign`` are the host's real functions; ``write_agent_yaml`` writes
    the device's agent.yaml pinning the fleet's public key.
    """

    def __init__(self, broker_url: str, prefix: str, tmp: Path) -> None:
        self.tmp = tmp
        self.device = f"dev{zlib.crc32(prefix.encode()):08x}"
        keys = tmp / "keys"
        generate_keys(keys / "signing.key", keys / "signing.pub")
        fleet = load_fleet(REPO / "fleet.yaml", broker_url=broker_url)
        self.fleet = replace(
            fleet,
            prefix=prefix,
            private_key=keys / "signing.key",
            public_key=keys / "signing.pub",
            devices={self.device: {}},
            groups={},
        )
        self.topics = self.fleet.topics
        self.models = tmp / "models"

    def model_file(self, model: onnx.ModelProto, tag: str) -> Path:
        return models.save(model, self.models / f"{tag}.onnx")

    def publish(self, model: onnx.ModelProto, version: int, name: str = "m", **kw: Any) -> Path:
        """Publish ``model`` as name@version in 16 KiB chunks; return its file."""
        path = self.model_file(model, f"{name}-{version}")
        kw.setdefault("chunk_size", 16 * 1024)
        publish_model(self.fleet, path, name, version, **kw)
        return path

    def assign(self, version: int, name: str = "m", rollback: bool = False) -> None:
        assign(self.fleet, name, version, devices=[self.device], rollback=rollback)

    def signed_desired(self, version: int, name: str = "m", rollback: bool = False) -> bytes:
        """A desired-state envelope written without assign's checks (for refusals)."""
        signer = self.fleet.signer()
        return signer.sign(Desired(self.device, name, version, signer.key_id, rollback).to_dict())

    def write_agent_yaml(self, broker_url: str, protocol: str = "3.1.1", **extra: Any) -> Path:
        doc = {
            "device_id": self.device,
            "broker": {"url": broker_url, "protocol": protocol, "keepalive": 5},
            "prefix": self.fleet.prefix,
            "public_keys": [str(self.fleet.public_key)],
            "store_dir": "store",
            "http": {"host": "127.0.0.1", "port": 0},
            "telemetry_interval_s": 0.5,
            "watch": {"window_s": 0},
            **extra,
        }
        path = self.tmp / "agent.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def agent(self, broker_url: str, protocol: str = "3.1.1", **extra: Any) -> Agent:
        """An in-process agent (not started) with short timeouts."""
        config = load_agent_config(self.write_agent_yaml(broker_url, protocol, **extra))
        return Agent(config, timing=FAST)


@pytest.fixture
def make_rig(prefix: str, tmp_path: Path) -> Callable[[str], Rig]:
    """``make_rig(broker_url)``: the fleet and device of this test on that broker."""
    return lambda url: Rig(url, prefix, tmp_path)


@pytest.fixture
def rig(mosquitto: Mosquitto, make_rig: Callable[[str], Rig]) -> Rig:
    return make_rig(mosquitto.url)


class Watcher:
    """Everything a device publishes, as a monitor would see it."""

    def __init__(self, broker_url: str, topics: Topics, device: str, client_id: str) -> None:
        self.topics = topics
        self.link = Link(BrokerSettings.from_url(broker_url), client_id)
        leaves = ("status", "state", "events", "telemetry")  # what the agent publishes
        self.sub = self.link.subscribe([topics.device(device, leaf) for leaf in leaves])
        self.seen: dict[str, list[Any]] = {}
        self.link.start()
        assert self.link.wait_connected(10)

    def _drain(self, timeout: float) -> None:
        msg = self.sub.get(timeout=timeout)
        while msg is not None:
            parsed = self.topics.parse_device_topic(msg.topic)
            if parsed is not None:
                leaf = parsed[1]
                body: Any = msg.payload.decode()
                if leaf != "status" and msg.payload:
                    body = json.loads(msg.payload)
                self.seen.setdefault(leaf, []).append(body)
            msg = self.sub.get(timeout=0)

    def wait(self, leaf: str, predicate: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        """The first message on ``leaf`` (seen so far or arriving) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            items = self.seen.get(leaf, [])
            for item in items[checked:]:
                if predicate(item):
                    return item
            checked = len(items)
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing matching on {leaf} after {timeout}s: {items[-5:]}")
            self._drain(0.1)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        self._drain(0)
        return [e for e in self.seen.get("events", []) if kind is None or e["type"] == kind]

    def event(self, kind: str, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
        """Wait for an event of ``kind`` whose fields include ``match``."""
        return self.wait(
            "events",
            lambda e: e["type"] == kind and all(e.get(k) == v for k, v in match.items()),
            timeout,
        )

    def close(self) -> None:
        self.link.stop()


@pytest.fixture
def watcher_for(prefix: str) -> Iterator[Callable[[str, Rig], Watcher]]:
    """``watcher_for(broker_url, rig)``: a monitor of the rig's device, closed after the test."""
    made: list[Watcher] = []

    def make(url: str, rig: Rig) -> Watcher:
        made.append(Watcher(url, rig.topics, rig.device, f"watch{len(made)}-{prefix}"))
        return made[-1]

    yield make
    for watcher in made:
        watcher.close()


@pytest.fixture
def watcher(mosquitto: Mosquitto, rig: Rig, watcher_for) -> Watcher:
    return watcher_for(mosquitto.url, rig)


class AgentProcess:
    """``slimfleet-agent --config ...`` as a child process, its log in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        exe = Path(sys.executable).with_name("slimfleet-agent")
        if exe.exists():
            command = [str(exe)]
        else:  # not installed as a script: the same entry point through python
            command = [sys.executable, "-c", "from slimfleet.agent.daemon import main; main()"]
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([*command, "--config", str(config), "-v"], stderr=out)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no offline message (the Last Will says it)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture
def spawn_agent(tmp_path: Path) -> Iterator[Callable[[Path], AgentProcess]]:
    """``spawn_agent(agent_yaml)`` starts an agent process; all are killed after the test."""
    started: list[AgentProcess] = []

    def spawn(config: Path) -> AgentProcess:
        started.append(AgentProcess(config, tmp_path / f"agent{len(started)}.log"))
        return started[-1]

    yield spawn
    for agent in started:
        if agent.proc.poll() is None:
            agent.kill()
