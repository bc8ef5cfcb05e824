"""Agent test helpers: model files (fast, slow, failing, broken), brokers, a publisher,
a fleet with one device, a watcher of what it publishes, agent processes."""

from __future__ import annotations

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
import numpy as np
import onnx
import pytest
import yaml
from brokers import Mosquitto
from onnx import TensorProto, helper, numpy_helper
from serving_rig import EVENT_TYPES, NO_WATCH, PipelineClients, Recorder

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent, Timing
from slimfleet.agent.deployment import SLOT_MAIN, DesiredState, SlotSpec, deployment_from_dict
from slimfleet.agent.link import Backoff, Link
from slimfleet.agent.mqtt import BrokerSettings, make_client
from slimfleet.agent.serving import DeploymentServer
from slimfleet.agent.watch import WatchPolicy
from slimfleet.agent.wire import ModelRef, Topics
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import publish_model

# -- model files ------------------------------------------------------------------


def _float(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _graph_model(nodes, name, inputs, outputs, inits) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    model = helper.make_model(
        helper.make_graph(nodes, name, inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])


def slow_add(value: float, rows: int = 32, width: int = 256, depth: int = 8) -> onnx.ModelProto:
    """y = x + value, plus an output ``work`` that depends on x through ``depth`` MatMuls.

    The MatMuls make the model itself slow (rows * width**2 * depth multiply-adds per
    request); nothing sleeps.
    """
    rng = np.random.default_rng(1)
    inits = [
        _float("c", np.full((4,), value)),
        helper.make_tensor("rows", TensorProto.INT64, [2], [rows, 4]),
        _float("p", rng.normal(0, 1, (4, width))),
        _float("w", rng.normal(0, 1 / np.sqrt(width), (width, width))),
    ]
    nodes = [
        helper.make_node("Add", ["x", "c"], ["y"]),
        helper.make_node("Expand", ["x", "rows"], ["xr"]),
        helper.make_node("MatMul", ["xr", "p"], ["h0"]),
    ]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{depth}"], ["work"]))
    work = helper.make_tensor_value_info("work", TensorProto.FLOAT, [rows, width])
    return _graph_model(nodes, "slow_add", [X], [Y, work], inits)


def gather_add(value: float, table: int = 2) -> onnx.ModelProto:
    """y = x + value for x in [0, table); other x make onnxruntime fail at run time.

    The inputs index a table (Gather on int(x)), like an embedding lookup that a new
    version shrank: its smoke sample (zeros) passes, real traffic fails.
    """
    inits = [_float("table", np.full((table,), value))]
    nodes = [
        helper.make_node("Cast", ["x"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["g"]),
        helper.make_node("Add", ["x", "g"], ["y"]),
    ]
    return _graph_model(nodes, "gather_add", [X], [Y], inits)


def two_inputs() -> onnx.ModelProto:
    """y = a + b."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", "b")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    return _graph_model(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two_inputs", inputs, [out], []
    )


class ModelFiles:
    """Writes test models into one folder, one file per call."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._count = 0

    def _save(self, model: onnx.ModelProto, stem: str) -> Path:
        self._count += 1
        return models.save(model, self.folder / f"{self._count:03d}-{stem}.onnx")

    def add(self, value: float) -> Path:
        return self._save(models.add_const(value), f"add{value:g}")

    def slow(self, value: float, **kwargs: int) -> Path:
        return self._save(slow_add(value, **kwargs), f"slow{value:g}")

    def gather(self, value: float, table: int = 2) -> Path:
        return self._save(gather_add(value, table), f"gather{value:g}")

    def mlp(self) -> Path:
        """Input x [batch, 64]: a free dimension, so no zeros can be made up for it."""
        return self._save(models.mlp(), "mlp")

    def two_inputs(self) -> Path:
        return self._save(two_inputs(), "two_inputs")

    def broken(self) -> Path:
        self._count += 1
        path = self.folder / f"{self._count:03d}-broken.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not an onnx model\x00\x01")
        return path


@pytest.fixture
def model_files(tmp_path: Path) -> ModelFiles:
    return ModelFiles(tmp_path / "model-files")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_serving(recorder: Recorder) -> Iterator[Callable[..., DeploymentServer]]:
    made: list[DeploymentServer] = []

    def make(watch: WatchPolicy = NO_WATCH, **kwargs: Any) -> DeploymentServer:
        server = DeploymentServer(
            watch=watch,
            on_event=recorder.on_event,
            on_fallback=recorder.on_fallback,
            on_settled=recorder.on_settled,
            **kwargs,
        )
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def pipeline_clients() -> type[PipelineClients]:
    """``with pipeline_clients(server) as clients:`` (see PipelineClients)."""
    return PipelineClients


# -- brokers and MQTT ------------------------------------------------------------


class Publisher:
    """A plain paho client that publishes retained QoS 1 messages and waits for PUBACK."""

    def __init__(self, broker: Mosquitto | str, client_id: str) -> None:
        settings = BrokerSettings.from_url(broker if isinstance(broker, str) else broker.url)
        self.client = make_client(settings, client_id)
        self.client.connect(settings.host, settings.port)
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

    ``publish`` is the host's real function; ``deploy``/``assign`` sign schema-2 desired
    states with the fleet key and publish them; ``write_agent_yaml`` writes the
    device's agent.yaml pinning the fleet's public key.
    """

    def __init__(self, broker_url: str, prefix: str, tmp: Path) -> None:
        self.tmp = tmp
        self.broker_url = broker_url
        self.seq = 0  # the last desired-state seq signed
        self._publisher: Publisher | None = None
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

    def desired(
        self,
        deployment: dict[str, Any],
        *,
        seq: int | None = None,
        issued: float | None = None,
        ttl_s: float = 3600.0,
        rollback: bool = False,
        device: str | None = None,
    ) -> bytes:
        """A signed schema-2 desired state; ``deployment`` maps slots to "name@version",
        a list of them (tiers) or a SlotSpec dict. ``seq`` defaults to the next one."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        issued = time.time() if issued is None else issued
        signer = self.fleet.signer()
        state = DesiredState(
            device=device or self.device,
            deployment=deployment_from_dict({k: _slot_doc(v) for k, v in deployment.items()}),
            key_id=signer.key_id,
            seq=seq,
            issued=issued,
            expires=issued + ttl_s,
            rollback=rollback,
        )
        return signer.sign(state.to_dict())

    def deploy(self, deployment: dict[str, Any], **kw: Any) -> bytes:
        """Sign and publish (retained) a desired state for the device; return the envelope."""
        envelope = self.desired(deployment, **kw)
        self.put_desired(envelope)
        return envelope

    def put_desired(self, envelope: bytes) -> None:
        if self._publisher is None:
            self._publisher = Publisher(self.broker_url, f"rig-{self.device}")
        self._publisher.put(self.topics.device(self.device, "desired"), envelope)

    def assign(
        self, version: int, name: str = "m", rollback: bool = False, slot: str = SLOT_MAIN
    ) -> bytes:
        """Deploy name@version alone in ``slot`` (what ``assign NAME@VERSION`` does)."""
        return self.deploy({slot: f"{name}@{version}"}, rollback=rollback)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()

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


def _slot_doc(value: Any) -> dict[str, Any]:
    if isinstance(value, SlotSpec):
        return value.to_dict()
    if isinstance(value, dict):
        return value
    names = [value] if isinstance(value, str) else list(value)
    return {"models": [ModelRef.parse(n).to_dict() for n in names]}


@pytest.fixture
def make_rig(prefix: str, tmp_path: Path) -> Iterator[Callable[[str], Rig]]:
    """``make_rig(broker_url)``: the fleet and device of this test on that broker."""
    made: list[Rig] = []

    def make(url: str) -> Rig:
        made.append(Rig(url, prefix, tmp_path))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


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
                if leaf == "events":  # every type the agent emits is part of the wire format
                    assert body["type"] in EVENT_TYPES, body
                    assert {"ts", "device", "slot", "model", "seq"} <= set(body), body
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


# -- the HTTP API over a real-onnxruntime backend (tests/oip_rig.py) -------------------
# Imported here, not at the top, so that this section stays one appended block.


@pytest.fixture
def oip_backend() -> Any:
    """An OrtBackend with slots det (masked_add, det@3) and rec (lookup, rec@5)."""
    from oip_rig import OrtBackend, lookup, masked_add

    from slimfleet.agent.wire import ModelRef

    return OrtBackend(
        {"det": (ModelRef("det", 3), masked_add()), "rec": (ModelRef("rec", 5), lookup())}
    )


@pytest.fixture
def oip_api(oip_backend: Any) -> Iterator[Any]:
    """The HTTP API over ``oip_backend`` on a free loopback port."""
    from slimfleet.agent.serve import HttpApi

    with HttpApi(oip_backend) as api:
        yield api
