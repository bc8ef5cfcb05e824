"""``slimfleet demo``: the whole path on one machine, with an embedded broker.

Builds (or takes) a model, compresses it by measurement, signs and publishes it
through an in-process MQTT broker, and lets a real agent download, verify, swap and
serve it over HTTP while a subscriber reads its telemetry and events.
"""

from __future__ import annotations

import io
import json
import queue
import socket
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent
from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.mqtt import BrokerSettings, make_client
from slimfleet.agent.wire import ModelRef, Topics
from slimfleet.host.compress.search import compress
from slimfleet.host.fleet.broker import EmbeddedBroker
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.deploy import assign_main
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import publish_model

DEVICE = "demo-01"
MODEL_NAME = "sensor-mlp"
PREFIX = "slimfleet/demo"


def demo_model(features: int = 256, hidden: int = 1024, classes: int = 12) -> onnx.ModelProto:
    """A sensor classifier: three dense layers, about 5 MB of float32 weights."""
    rng = np.random.default_rng(7)
    sizes = [(features, hidden), (hidden, hidden), (hidden, classes)]
    inits, nodes, current = [], [], "x"
    for i, (n_in, n_out) in enumerate(sizes):
        w = rng.normal(0, (2 / n_in) ** 0.5, (n_in, n_out)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(rng.normal(0, 0.05, n_out).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"], name=f"dense{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}"),
        ]
        current = f"a{i}"
        if i < len(sizes) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"], name=f"relu{i}"))
            current = f"r{i}"
    nodes.append(helper.make_node("Softmax", [current], ["probs"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        "sensor_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _times(ratio: float | None, word: str) -> str:
    """0.25 -> '4.0x smaller'."""
    return f"{1 / ratio:.1f}x {word}" if ratio else f"? {word}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Monitor:
    """A plain MQTT subscriber to every device's telemetry and events."""

    def __init__(self, settings: BrokerSettings, topics: Topics) -> None:
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._client = make_client(settings, "slimfleet-demo-monitor")
        self._client.on_message = lambda _c, _u, msg: self.messages.put(
            (msg.topic.rsplit("/", 1)[-1], json.loads(msg.payload))
        )
        self._client.connect(settings.host, settings.port)
        self._client.subscribe(
            [(topics.all_devices("telemetry"), 0), (topics.all_devices("events"), 0)]
        )
        self._client.loop_start()

    def wait_for(self, leaf: str, timeout: float, predicate: Any = None) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got_leaf, doc = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if got_leaf == leaf and (predicate is None or predicate(doc)):
                return doc
        return None

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _write_configs(work: Path, broker_url: str) -> tuple[Path, Path]:
    fleet_path = work / "fleet.yaml"
    fleet_path.write_text(
        textwrap.dedent(f"""\
            # written by `slimfleet demo`
            broker: {broker_url}
            prefix: {PREFIX}
            keys:
              private: keys/signing.key
              public: keys/signing.pub
            devices:
              {DEVICE}: {{}}
            groups:
              all: [{DEVICE}]
            """)
    )
    agent_path = work / "agent.yaml"
    agent_path.write_text(
        textwrap.dedent(f"""\
            # written by `slimfleet demo`
            device_id: {DEVICE}
            broker: {broker_url}
            prefix: {PREFIX}
            public_keys: [keys/signing.pub]
            store_dir: agent-store
            http: {{host: 127.0.0.1, port: 0}}
            telemetry_interval_s: 1
            watch: {{window_s: 2, min_requests: 20}}
            """)
    )
    return fleet_path, agent_path


def _predict_http(url: str, sample: np.ndarray) -> np.ndarray:
    body = io.BytesIO()
    np.save(body, sample)
    request = urllib.request.Request(
        f"{url}/v1/predict",
        data=body.getvalue(),
        headers={"Content-Type": "application/x-npy"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return np.load(io.BytesIO(response.read()))


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("slimfleet-demo"),
    show_default=True,
    help="Where the model, keys, configs and the agent's store go (must be new or empty).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An fp32 ONNX model with static input shapes (default: a generated 5 MB MLP).",
)
@click.option("--requests", default=200, show_default=True, help="HTTP requests to send.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
def demo(workdir: Path, model_path: Path | None, requests: int, as_json: bool) -> None:
    """Compress, sign, publish, download, hot-swap and serve a model on this machine.

    Runs an embedded MQTT broker (no broker to install), a real agent with its HTTP
    API, and a subscriber that reads the agent's telemetry. Everything stays under
    WORKDIR; nothing listens beyond 127.0.0.1.
    """
    if workdir.exists() and any(workdir.iterdir()):
        raise click.BadParameter(f"{workdir} is not empty", param_hint="--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    say = (lambda *_: None) if as_json else click.echo
    summary: dict[str, Any] = {}

    if model_path is None:
        model_path = workdir / "model.onnx"
        onnx.save(demo_model(), str(model_path))
        data = {"x": np.random.default_rng(1).normal(size=(48, 1, 256)).astype(np.float32)}
        np.savez(workdir / "data.npz", **data)
        data_path: Path | None = workdir / "data.npz"
    else:
        data_path = None
    say(f"1/4 compress {model_path} (every candidate measured on this machine)")
    with click.progressbar(
        length=1, label="    candidates", file=None if not as_json else io.StringIO()
    ) as bar:

        def progress(done: int, total: int, label: str) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        report = compress(model_path, workdir / "compressed", data=data_path, progress=progress)
    summary["compress"] = report.summary
    s = report.summary
    say(
        f"    chose {s.get('chosen')}: {_times(s.get('size_ratio'), 'smaller')}, "
        f"{_times(s.get('latency_ratio'), 'faster')}, fidelity {s.get('fidelity')}"
    )

    say("2/4 start an embedded MQTT broker and a device agent")
    generate_keys(workdir / "keys" / "signing.key", workdir / "keys" / "signing.pub")
    broker = EmbeddedBroker("127.0.0.1", _free_port()).start()
    agent: Agent | None = None
    monitor: _Monitor | None = None
    try:
        fleet_path, agent_path = _write_configs(workdir, broker.url)
        fleet = load_fleet(fleet_path, broker_url=broker.url)
        agent = Agent(load_agent_config(agent_path))
        agent.start()
        monitor = _Monitor(fleet.broker, fleet.topics)
        say(f"    broker {broker.url}, agent {DEVICE} serving HTTP at {agent.http_url}")

        say("3/4 sign, publish and assign the compressed model")
        started = time.monotonic()
        result = publish_model(fleet, workdir / "compressed", MODEL_NAME, 1)
        assign_main(fleet, ModelRef(MODEL_NAME, 1), [DEVICE])
        swap = monitor.wait_for("events", 120, lambda e: e.get("type") in ("swap_ok", "fallback"))
        if swap is None or swap["type"] != "swap_ok":
            raise SlimfleetError(f"the agent did not swap to the new model: {swap}")
        summary["delivery"] = {
            "chunks": result.chunks,
            "bytes": result.size,
            "seconds_to_serving": round(time.monotonic() - started, 2),
            "swap_ms": swap.get("total_ms"),
        }
        say(
            f"    {result.size / 1e6:.1f} MB in {summary['delivery']['chunks']} signed chunks; "
            f"serving after {summary['delivery']['seconds_to_serving']} s"
        )
        assert agent.serving.current == ModelRef(MODEL_NAME, 1)

        say(f"4/4 send {requests} HTTP requests and read the telemetry")
        shape = [d if isinstance(d, int) else 1 for d in agent.serving.io.inputs[0].shape]
        rng = np.random.default_rng(2)
        failed = 0
        for _ in range(requests):
            try:
                _predict_http(agent.http_url or "", rng.normal(size=shape).astype(np.float32))
            except OSError:
                failed += 1
        telemetry = monitor.wait_for("telemetry", 10, lambda t: t.get("requests", 0) > 0)
        summary["serving"] = {"requests": requests, "failed": failed, "telemetry": telemetry}
        if telemetry:
            lat = telemetry["latency_ms"] or {}
            say(
                f"    {requests - failed}/{requests} ok; telemetry: {telemetry['requests']} requests, "
                f"p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, RSS {telemetry['rss_bytes'] / 1e6:.0f} MB"
            )
    finally:
        if monitor is not None:
            monitor.close()
        if agent is not None:
            agent.stop()
        broker.stop()
    say(f"done. Report: {workdir / 'compressed' / 'report.html'}")
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    if failed:
        raise SlimfleetError(f"{failed} of {requests} requests failed")
