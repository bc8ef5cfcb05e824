"""A fleet with identities on a real mosquitto that runs the files 'slimfleet acl' and
'slimfleet certs' generate (mutual TLS with a CA made here), and a paho client to probe it."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from brokers import Mosquitto, free_port

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent
from slimfleet.agent.mqtt import BrokerSettings, make_client
from slimfleet.host.fleet.acl import TlsFiles, password_for, write_acl_bundle
from slimfleet.host.fleet.certs import issue_certs
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.keys import generate_keys

FLEET_YAML = """\
broker: {broker}
prefix: {prefix}
keys: {{private: keys/signing.key, public: keys/signing.pub}}
devices:
  cam-01: {{site: lab}}
  cam-02: {{site: lab}}
identities:
  host: [host]
  monitors: [monitor]
"""
HOST_BROKER = """
  url: mqtts://127.0.0.1:{port}
  username: host
  password_file: secrets/host.password
  ca_file: certs/ca.pem
  cert_file: certs/host.pem
  key_file: certs/host.key"""


class SecureFleet:
    """fleet.yaml with identities, its certs and ACL bundle, and mosquitto running them."""

    def __init__(self, root: Path, prefix: str, *, tls: bool = True) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "fleet.yaml"
        self.path.write_text(FLEET_YAML.format(prefix=prefix, broker="mqtt://127.0.0.1:1883"))
        generate_keys(root / "keys" / "signing.key", root / "keys" / "signing.pub")
        self.tls = tls
        self.device_port, self.host_port = free_port(), free_port()
        base = load_fleet(self.path)
        assert base.identities is not None
        self.identities = base.identities
        certs = self.identities.certs
        tls_files = None
        if tls:
            users = [*base.devices, *self.identities.hosts, *self.identities.monitors]
            issue_certs(certs, users, ["127.0.0.1", "localhost"])
            tls_files = TlsFiles(certs / "ca.pem", certs / "broker.pem", certs / "broker.key")
        self.bundle = write_acl_bundle(
            base,
            root / "mosquitto",
            device_port=self.device_port,
            host_port=self.host_port,
            bind="127.0.0.1",
            tls=tls_files,
        )
        conf = (self.bundle.out / "mosquitto.conf").read_text()
        self.broker = Mosquitto(root / "broker", port=self.device_port, config=conf)
        if tls:  # the host's broker section, as a user writes it, now its files exist
            broker = HOST_BROKER.format(port=self.host_port)
            self.path.write_text(FLEET_YAML.format(prefix=prefix, broker=broker))
            self.fleet = load_fleet(self.path)
            assert self.fleet.broker == self.settings("host")
        else:
            self.fleet = replace(base, broker=self.settings("host"))

    def settings(self, user: str | None, *, host_listener: bool | None = None) -> BrokerSettings:
        """How ``user`` logs in (None: anonymous). The host role uses the host listener
        with its password (and certificate); other roles the device listener."""
        on_host = host_listener if host_listener is not None else user in self.identities.hosts
        port = self.host_port if on_host else self.device_port
        password = password_for(self.identities, user)[0] if user and on_host else None
        if not self.tls:
            password = password_for(self.identities, user)[0] if user else None
            return BrokerSettings("127.0.0.1", port, username=user, password=password)
        certs = self.identities.certs
        return BrokerSettings(
            "127.0.0.1",
            port,
            True,
            username=user if password else None,
            password=password,
            ca_file=certs / "ca.pem",
            cert_file=certs / f"{user}.pem" if user else None,
            key_file=certs / f"{user}.key" if user else None,
        )

    def agent_yaml(self, folder: Path, device_id: str, identity: str, port: int) -> Path:
        """agent.yaml for ``device_id`` holding ``identity``'s credentials, by reference:
        its certificate and key with TLS, else its password file."""
        secret = self.identities.certs if self.tls else self.identities.secrets
        broker: dict[str, object] = {"keepalive": 5}
        if self.tls:
            broker["url"] = f"mqtts://127.0.0.1:{port}"
            broker["ca_file"] = str(secret / "ca.pem")
            broker["cert_file"] = str(secret / f"{identity}.pem")
            broker["key_file"] = str(secret / f"{identity}.key")
        else:
            broker["url"] = f"mqtt://127.0.0.1:{port}"
            broker["username"] = identity
            broker["password_file"] = str(secret / f"{identity}.password")
        doc = {
            "device_id": device_id,
            "broker": broker,
            "prefix": self.fleet.prefix,
            "public_keys": [str(self.fleet.public_key)],
            "store_dir": "store",
            "telemetry_interval_s": 0.5,
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "agent.yaml").write_text(yaml.safe_dump(doc))
        return folder / "agent.yaml"

    def reports_of(self, device: str, at: BrokerSettings, wait: float) -> dict[str, bytes]:
        """What a monitor logged in at ``at`` reads of ``device``'s topics within ``wait``."""
        own = self.settings("monitor")
        settings = replace(own, host=at.host, port=at.port) if not self.tls else own
        monitor = connect(settings, "monitor")
        try:
            return monitor.read(self.fleet.topics.device(device, "+"), wait=wait)
        finally:
            monitor.close()


def run_agent(config_path: Path, seconds: float) -> None:
    """Run a real agent from ``config_path`` for ``seconds``, then stop it."""
    agent = Agent(load_agent_config(config_path))
    agent.start()
    try:
        time.sleep(seconds)
    finally:
        agent.stop()


@dataclass
class Probe:
    """A connected paho client that records what it receives and whether it was dropped."""

    client: mqtt.Client
    connack: object
    messages: dict[str, bytes] = field(default_factory=dict)
    dropped: threading.Event = field(default_factory=threading.Event)

    @property
    def accepted(self) -> bool:
        return not getattr(self.connack, "is_failure", True)

    def read(self, topic_filter: str, wait: float = 1.0) -> dict[str, bytes]:
        """Subscribe and gather what arrives within ``wait`` seconds."""
        self.client.subscribe(topic_filter, 1)
        time.sleep(wait)
        return dict(self.messages)

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(settings: BrokerSettings, client_id: str, *, persistent: bool = False) -> Probe:
    """Connect with ``client_id``; the probe's ``accepted`` says what the broker answered."""
    client = make_client(settings, client_id, persistent=persistent)
    answered = threading.Event()
    probe = Probe(client, None)

    def on_connect(c, userdata, flags, reason_code, properties):
        probe.connack = reason_code
        answered.set()

    def on_disconnect(c, userdata, flags, reason_code, properties):
        probe.dropped.set()
        answered.set()

    def on_message(c, userdata, message):
        probe.messages[message.topic] = bytes(message.payload)

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    client.on_message = on_message
    try:
        client.connect(settings.host, settings.port, 30)
    except OSError:  # a TLS handshake refused without a client certificate
        probe.dropped.set()
        return probe
    client.loop_start()
    answered.wait(10)
    return probe


# -- what a real agent serves, for the attacks on it (tests/security/test_agent_*.py) -------

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def served(agent: Agent) -> float:
    """The constant the agent's main slot adds (models.add_const), through its inference."""
    answer = agent.infer({"x": X})["y"]
    return float(answer[0, 0] - X[0, 0])


def at(seq: int, result: str | None = None) -> Callable[[dict[str, Any]], bool]:
    """A predicate on the agent's state document: it has handled desired state ``seq``
    (with ``result``, e.g. serving, refused, pending, stale, when given)."""

    def check(state: dict[str, Any]) -> bool:
        handled = state.get("desired") or {}
        return handled.get("seq") == seq and result in (None, handled.get("outcome"))

    return check


def load_agent_rig() -> ModuleType:
    """tests/agent/conftest.py loaded by path as module ``security_agent_rig``: its Rig,
    Watcher, Publisher and AgentProcess drive a real agent on real mosquitto for the
    security suite and bench/attack_bench.py too."""
    if "security_agent_rig" in sys.modules:
        return sys.modules["security_agent_rig"]
    path = Path(__file__).resolve().parent / "agent" / "conftest.py"
    spec = importlib.util.spec_from_file_location("security_agent_rig", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
