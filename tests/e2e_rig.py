"""End-to-end rig: a fleet file on the test broker, REAL agents (the in-process ``Agent``
class, each with its own agent.yaml, store and HTTP port) and the real ``slimfleet`` CLI,
run in this process through its entry point or as a child process.

Agents report every 0.3 s and keep no watch window unless asked, so that a whole wave or
outcome settles in a second or two.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import models
import numpy as np
import onnx
import pytest
import yaml
from brokers import Mosquitto

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent, Timing
from slimfleet.agent.link import Backoff
from slimfleet.agent.mqtt import BrokerSettings, make_client
from slimfleet.agent.wire import make_manifest
from slimfleet.host.cli import main
from slimfleet.host.fleet.config import BROKER_ENV, FleetConfig, load_fleet
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import publish_manifest, publish_model

DEVICES = ("d1", "d2", "d3")
X = np.zeros((1, 4), np.float32)  # what the test traffic sends
TIMING = Timing(
    manifest_timeout_s=5.0,
    chunk_timeout_s=5.0,
    retry=Backoff(initial_s=0.3, max_s=1.0),
    link=Backoff(initial_s=0.1, max_s=0.5),
)


@dataclass
class Run:
    """What one ``slimfleet`` command did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def one_line_error(self) -> str:
        """The single ``error: ...`` line a bad input must produce (and nothing else).

        In-process agents log through this process's handlers: their lines are skipped."""
        agents = "WARNING slimfleet.agent."
        lines = [line for line in self.err.strip().splitlines() if not line.startswith(agents)]
        assert len(lines) == 1 and lines[0].startswith("error: "), (self.code, self.err)
        assert "Traceback" not in self.err
        return lines[0]


class E2E:
    """One fleet (devices d1, d2, d3; groups ``one`` = d1, ``trio`` = all three) on the
    test broker, its published models, its running agents and its CLI."""

    def __init__(self, broker: Mosquitto, prefix: str, tmp: Path, capsys, monkeypatch) -> None:
        self.broker = broker
        self.tmp = tmp
        self._capsys = capsys
        self._monkeypatch = monkeypatch
        self.fleet_file = tmp / "fleet.yaml"
        doc = {
            "broker": {"url": broker.url},
            "prefix": prefix,
            "keys": {"private": "keys/signing.key", "public": "keys/signing.pub"},
            "devices": {d: {} for d in DEVICES},
            "groups": {"one": ["d1"], "trio": list(DEVICES)},
            "desired_ttl_s": 3600,
            "rollouts": {"defaults": {"waves": "1,100%", "soak_s": 1.0, "timeout_s": 20.0}},
        }
        self.fleet_file.write_text(yaml.safe_dump(doc))
        self.fleet: FleetConfig = load_fleet(self.fleet_file)
        generate_keys(self.fleet.private_key, self.fleet.public_key)
        self.agents: dict[str, Agent] = {}
        self._closers: list[Callable[[], None]] = []

    # -- models -------------------------------------------------------------------------

    def publish(self, model: onnx.ModelProto, name: str, version: int, **kw: Any) -> Path:
        path = models.save(model, self.tmp / "models" / f"{name}-{version}.onnx")
        publish_model(self.fleet, path, name, version, **kw)
        return path

    def publish_unloadable(self, name: str, version: int) -> None:
        """Publish bytes that are not an ONNX model, signed like any model (no smoke test
        could be recorded: it is the device's load that fails)."""
        signer = self.fleet.signer()
        manifest, chunks = make_manifest(
            name, version, b"not an onnx model" * 500, io={}, opset=13, key_id=signer.key_id
        )
        publish_manifest(self.fleet, manifest, chunks, signer=signer)

    def events(self, device: str) -> Events:
        """A subscriber to ``device``'s events, already subscribed (closed by the fixture)."""
        events = Events(self.broker.url, self.fleet.topics.device(device, "events"))
        self._closers.append(events.close)
        return events

    # -- agents -------------------------------------------------------------------------

    def agent_yaml(self, device: str, **extra: Any) -> Path:
        """Write ``device``'s agent.yaml (keys in ``extra`` override) in its own folder."""
        home = self.tmp / "agents" / device
        home.mkdir(parents=True, exist_ok=True)
        doc = {
            "device_id": device,
            "broker": {"url": self.broker.url, "keepalive": 5},
            "prefix": self.fleet.prefix,
            "public_keys": [str(self.fleet.public_key)],
            "store_dir": "store",
            "http": {"host": "127.0.0.1", "port": 0},
            "telemetry_interval_s": 0.3,
            "watch": {"window_s": 0},
            **extra,
        }
        (home / "agent.yaml").write_text(yaml.safe_dump(doc))
        return home / "agent.yaml"

    def agent(self, device: str, **extra: Any) -> Agent:
        """Start a real in-process agent for ``device`` (see ``agent_yaml``)."""
        agent = Agent(load_agent_config(self.agent_yaml(device, **extra)), timing=TIMING)
        agent.start()
        self.agents[device] = agent
        return agent

    def agent_process(self, device: str, **extra: Any) -> subprocess.Popen[bytes]:
        """Start ``slimfleet-agent --config`` for ``device`` (killed by the fixture at the
        latest); its log goes to ``agents/DEVICE/agent.log``."""
        config = self.agent_yaml(device, **extra)
        exe = Path(sys.executable).with_name("slimfleet-agent")
        with open(config.with_name("agent.log"), "ab") as log:
            proc = subprocess.Popen([str(exe), "--config", str(config)], stderr=log)
        self._closers.append(lambda: _kill(proc))
        return proc

    def close(self) -> None:
        """Stop every agent and close every subscriber and server of the test."""
        for agent in self.agents.values():
            agent.stop()
        self.agents.clear()
        for close in self._closers:
            close()

    # -- the CLI --------------------------------------------------------------------------

    def cli(self, *args: str | Path, broker: str | None = None) -> Run:
        """``slimfleet ARGS --fleet FILE`` through the real entry point, in this process."""
        self._monkeypatch.setenv(BROKER_ENV, broker or self.broker.url)
        argv = ["slimfleet", *map(str, args), "--fleet", str(self.fleet_file)]
        self._monkeypatch.setattr(sys, "argv", argv)
        self._capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = self._capsys.readouterr()
        return Run(exit_info.value.code, out, err)

    def spawn(self, *args: str | Path, connected: bool = False) -> subprocess.Popen[str]:
        """``slimfleet ARGS --fleet FILE`` as another process (stdout and stderr piped).

        ``connected``: run it with ``-vv`` and return once its debug log says it connected
        to the broker (it subscribes right after), so that little published later is missed.
        """
        exe = Path(sys.executable).with_name("slimfleet")
        env = {**os.environ, BROKER_ENV: self.broker.url}
        verbose = ["-vv"] if connected else []
        proc = subprocess.Popen(
            [str(exe), *verbose, *map(str, args), "--fleet", str(self.fleet_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._closers.append(lambda: _kill(proc))
        while connected:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line, f"slimfleet {args} ended before connecting (exit {proc.wait()})"
            connected = "connected to" not in line
        return proc

    def run(self, *args: str | Path, timeout: float = 60) -> Run:
        """``spawn`` and wait for it."""
        proc = self.spawn(*args)
        out, err = proc.communicate(timeout=timeout)
        return Run(proc.returncode, out, err)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``predicate`` every 50 ms until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


def infer_json(agent: Agent, slot: str, x: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """POST one FP32 input ``x`` to the agent's ``/v2/models/{slot}/infer``; the answer
    document and its headers."""
    array = np.asarray(x, dtype=np.float32)
    body = {
        "inputs": [
            {
                "name": "x",
                "shape": list(array.shape),
                "datatype": "FP32",
                "data": array.ravel().tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"{agent.http_url}/v2/models/{slot}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read()), dict(response.headers)


def slow_model(value: float, rows: int = 64, width: int = 256, depth: int = 64) -> onnx.ModelProto:
    """y = x + value, plus ``busy``: x tiled to ``rows`` rows, spread over ``width``
    columns, through ``depth`` width x width MatMuls: ~rows * depth * width**2
    multiply-adds per request, and nothing sleeps. How long that takes depends on the
    machine (2.6 ms at the defaults on one, several times more on others): for a given
    time, take ``depth`` from :func:`models.matmul_depth`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weights = [
        numpy_helper.from_array(np.full((4,), value, np.float32), "c"),
        numpy_helper.from_array(np.array([rows, 1], np.int64), "repeats"),
        numpy_helper.from_array(rng.normal(0, 1, (4, width)).astype(np.float32), "spread"),
        numpy_helper.from_array(
            (rng.normal(0, 1, (width, width)) / np.sqrt(width)).astype(np.float32), "mix"
        ),
    ]
    nodes = [
        helper.make_node("Add", ["x", "c"], ["y"]),
        helper.make_node("Tile", ["x", "repeats"], ["tiled"]),
        helper.make_node("MatMul", ["tiled", "spread"], ["b0"]),
    ]
    nodes += [helper.make_node("MatMul", [f"b{i}", "mix"], [f"b{i + 1}"]) for i in range(depth)]
    nodes.append(helper.make_node("Identity", [f"b{depth}"], ["busy"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("busy", TensorProto.FLOAT, [rows, width]),
        ],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def serving(agent) -> dict:
    return {
        slot: [str(m) for m in spec.models] for slot, spec in (agent.state.current or {}).items()
    }


class Traffic:
    """Requests to one slot of an agent's HTTP API from a thread, until ``stop``
    (telemetry reports latency per interval: status sees it only under load)."""

    def __init__(self, agent, slot: str = "main") -> None:
        self.answers: list[list[float]] = []
        self._done = threading.Event()

        def run() -> None:
            while not self._done.is_set():
                doc, _ = infer_json(agent, slot, X)
                self.answers.append(doc["outputs"][0]["data"])
                time.sleep(0.01)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)


class Events:
    """Every event one device publishes, from a plain paho subscriber."""

    def __init__(self, url: str, topic: str) -> None:
        settings = BrokerSettings.from_url(url)
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards seen (paho thread appends, the test reads)
        subscribed = threading.Event()
        self.client = make_client(settings, f"e2e-events-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(settings.host, settings.port)
        self.client.loop_start()
        assert subscribed.wait(10), f"no SUBACK for {topic}"

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.seen.append(json.loads(message.payload))

    def wait(self, kind: str, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
        """The first event of ``kind`` whose fields include ``match``."""

        def found() -> dict[str, Any] | None:
            with self._lock:
                for event in self.seen:
                    if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                        return event
            return None

        return wait_until(found, timeout, f"a {kind} event {match}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class OipServer:
    """The user's own server in a remote tier: Open Inference Protocol v2 JSON,
    answering y = x + 100 after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        outer = self
        self.delay_s = delay_s
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.calls += 1
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                first = doc["inputs"][0]
                y = np.asarray(first["data"], np.float32) + 100
                out = {"name": "y", "shape": first["shape"], "datatype": "FP32"}
                body = json.dumps({"outputs": [{**out, "data": y.tolist()}]}).encode()
                time.sleep(outer.delay_s)
                with contextlib.suppress(OSError):  # the agent gave up waiting
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v2/models/y/infer"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
