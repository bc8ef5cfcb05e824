"""What agent_bench.py and fleet_bench.py share: a loopback mosquitto, a bench fleet with
fresh keys, agent.yaml files, publishing and assigning, waiting for a device to serve,
and the figures' formatting (pure functions, tested in tests/bench/test_agent_rig.py).

Bounds: every wait has a timeout (``wait_serving``: 300 s by default) and exits the
bench with one line saying what did not happen.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from slimfleet.agent.daemon import Agent
from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet.config import FleetConfig, load_fleet
from slimfleet.host.fleet.deploy import assign, connect, main_slot
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import publish_model

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
from brokers import Mosquitto  # noqa: E402  (the tests' mosquitto launcher)

MB = 1e6


def say(line: str) -> None:
    print(line, flush=True)


def note(line: str) -> None:
    print(f"  . {line}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# -- pure figures -------------------------------------------------------------------------


def growth(values: Mapping[int, float]) -> dict[int, float]:
    """Each value over the value at the smallest N: ``{25: 1.0, 100: 3.9, ...}``."""
    if not values:
        return {}
    base = values[min(values)]
    return {n: (v / base if base else float("inf")) for n, v in sorted(values.items())}


def scaling(values: Mapping[int, float]) -> str:
    """How a figure grows against N: "linear or better" when value/N never grows by more
    than 25% over the smallest N's, else "superlinear" (with the worst factor)."""
    if len(values) < 2:
        return "one N only"
    low = min(values)
    per_n = {n: v / n for n, v in values.items()}
    worst = max(per_n[n] / per_n[low] if per_n[low] else float("inf") for n in values)
    return "linear or better" if worst <= 1.25 else f"superlinear (x{worst:.2f} per device)"


def growth_line(label: str, values: Mapping[int, float], unit: str, spec: str = ".2f") -> str:
    """``label: N=25 1.20 s, N=100 4.10 s (x3.42), ... -> linear or better``."""
    ratios = growth(values)
    cells = []
    for n, v in sorted(values.items()):
        cell = f"N={n} {v:{spec}}{unit}"
        if n != min(values):
            cell += f" (x{ratios[n]:.2f})"
        cells.append(cell)
    return f"{label}: {', '.join(cells)}"


def breakdown(parts: Mapping[str, Sequence[float]]) -> str:
    """Median of each part, in ms, with its share of the first part (the total)."""
    medians = {k: statistics.median(v) for k, v in parts.items() if v}
    total = next(iter(medians.values()), 0.0)
    cells = []
    for key, value in medians.items():
        share = f" {value / total:.0%}" if total and key != next(iter(medians)) else ""
        cells.append(f"{key} {ms(value)}{share}")
    return ", ".join(cells)


# -- setup ------------------------------------------------------------------------------


def start_broker(tmp: Path, *, sys_interval: int | None = None) -> Mosquitto:
    """A loopback mosquitto without persistence (hundreds of MB of retained models);
    ``sys_interval`` publishes its $SYS counters every that many seconds."""
    broker = Mosquitto(tmp / "mosquitto")
    conf = broker.conf.read_text().replace("persistence true", "persistence false")
    if sys_interval is not None:
        conf += f"sys_interval {sys_interval}\n"
    broker.conf.write_text(conf)
    broker.start()
    return broker


def make_fleet(tmp: Path, url: str, devices: Iterable[str]) -> FleetConfig:
    keys = tmp / "keys"
    if not (keys / "signing.key").exists():
        generate_keys(keys / "signing.key", keys / "signing.pub")
    fleet = load_fleet(REPO / "fleet.yaml", broker_url=url)
    return replace(
        fleet,
        prefix=f"slimfleet-bench/{os.getpid()}",
        private_key=keys / "signing.key",
        public_key=keys / "signing.pub",
        devices={d: {} for d in devices},
        groups={},
    )


def agent_doc(fleet: FleetConfig, url: str, device: str, store: Path, **extra: Any) -> dict:
    """An agent.yaml document for ``device`` (1 thread, HTTP on a free port, no watch
    window: the benches swap between models on purpose)."""
    return {
        "device_id": device,
        "broker": url,
        "prefix": fleet.prefix,
        "public_keys": [str(fleet.public_key)],
        "store_dir": str(store),
        "threads": 1,
        "http": {"host": "127.0.0.1", "port": 0},
        "telemetry_interval_s": 60,
        "watch": {"window_s": 0},
        **extra,
    }


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


class Publisher:
    """Publishes OUTDIRs as ``name`` under fresh versions and assigns them (slot main)."""

    def __init__(self, fleet: FleetConfig, dirs: Mapping[str, Path], name: str) -> None:
        self.fleet = fleet
        self.dirs = dirs
        self.name = name
        self.version = 0

    def publish(self, kind: str) -> int:
        self.version += 1
        publish_model(self.fleet, self.dirs[kind], self.name, self.version)
        return self.version

    def assign(self, version: int, devices: list[str], rollback: bool = False) -> dict[str, int]:
        """Assign ``name@version`` to ``devices``; the seq of each one's desired state."""
        ref = ModelRef(self.name, version)
        with connect(self.fleet) as link:
            issued = assign(self.fleet, link, main_slot(ref), devices, rollback=rollback)
        return {d.device: d.seq for d in issued}


def serving_seq(agent: Agent) -> int | None:
    """The seq of the desired state the agent last switched to (None before any)."""
    update = agent.last_update
    return None if update is None else update.get("seq")


def wait_serving(agent: Agent, seq: int, timeout: float = 300.0) -> dict[str, Any]:
    """Wait until the agent serves the desired state ``seq``; its update figures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        update = agent.last_update
        if update is not None and update.get("seq") == seq:
            return update
        time.sleep(0.01)
    doc = agent.state_document()
    sys.exit(f"desired seq {seq} was not serving after {timeout:.0f}s: state {doc}")


def mosquitto_pub_rate(broker: Mosquitto, chunk_file: Path, count: int) -> float:
    """Bytes/s from mosquitto_pub to mosquitto_sub through the broker, ``count`` chunks."""
    topic = f"slimfleet-bench/raw/{os.getpid()}"
    port = str(broker.port)
    sub = subprocess.Popen(
        ["mosquitto_sub", "-p", port, "-t", topic, "-q", "1", "-C", str(count), "-N"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let it subscribe
    started = time.perf_counter()
    command = ["mosquitto_pub", "-p", port, "-t", topic, "-q", "1", "-f", str(chunk_file)]
    subprocess.run([*command, "--repeat", str(count)], check=True)
    sub.wait(timeout=120)
    return count * chunk_file.stat().st_size / (time.perf_counter() - started)


def session_footprint(outdir: Path) -> int:
    """RSS added by one loaded and warmed-up session, in a fresh process."""
    code = (
        "import sys, numpy as np, psutil\n"
        "from slimfleet.agent.runtime import open_session\n"
        "p = psutil.Process()\n"
        "feeds = dict(np.load(sys.argv[2]))\n"
        "before = p.memory_info().rss\n"
        "s = open_session(sys.argv[1], 1)\n"
        "s.run(None, feeds)\n"
        "print(p.memory_info().rss - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(outdir / "model.onnx"), str(outdir / "sample.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())
