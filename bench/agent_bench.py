"""The edge agent against bare onnxruntime and mosquitto's own clients (issue 3, item 7).

On ddddocr's ``common.onnx`` (fp32) and a compressed version, every ratio measured
against a baseline taken in the same run:

(a) agent in-process ``infer`` / bare ``session.run`` (same session options), medians;
(b) local HTTP predict overhead over in-process, in ms;
(c) 20 swaps (each a download of a new version) while 4 client threads call ``infer``
    non-stop: failed requests, p99 during swaps / p99 steady, and swap time (manifest
    seen -> new model serving, minus the download) / bare onnxruntime load + warm-up
    (both under the same 4-client load);
(d) delivery throughput through loopback mosquitto / ``mosquitto_pub`` -> ``mosquitto_sub``
    sending the same number of bytes in the same chunk size;
(e) RSS growth of an agent process from its first swap to its 50th (two versions of
    the fp32 model alternating) against one session's footprint (measured in a fresh
    process), and the agent's RSS with no model loaded.

The compressed model is what ``slimfleet compress`` chooses for common.onnx on captcha
samples (generated as in ``compress_bench.py``), or an existing compress OUTDIR given
with ``--compressed``. Run::

    python bench/agent_bench.py            # about 5 minutes on 2 cores (2 of them compressing)
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent
from slimfleet.agent.link import Link
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.wire import DEFAULT_CHUNK_SIZE
from slimfleet.host.fleet.config import FleetConfig, load_fleet
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import assign, publish_model

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]
from benchlib import session as bare_session  # noqa: E402  (the agent's session options)
from brokers import Mosquitto  # noqa: E402  (the tests' mosquitto launcher)
from compress_bench import ensure_packages, ocr_samples  # noqa: E402

DEVICE = "bench-01"  # the in-process agent
RSS_DEVICE = "bench-02"  # the agent process of (e), a fresh device
NAME = "ocr"
CLIENTS = 4
MB = 1e6


def say(line: str) -> None:
    print(line, flush=True)


def note(line: str) -> None:
    print(f"  . {line}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# -- setup --------------------------------------------------------------------------


def common_onnx() -> Path:
    try:
        import ddddocr
    except ImportError:
        sys.exit("ddddocr is not installed: pip install ddddocr (it ships common.onnx)")
    path = Path(ddddocr.__file__).parent / "common.onnx"
    if not path.is_file():
        sys.exit(f"{path} is missing from the ddddocr package")
    return path


def compress_common(tmp: Path) -> Path:
    """Run slimfleet's search on common.onnx with captcha samples; return its OUTDIR."""
    from slimfleet.host.compress.search import compress

    ensure_packages()
    data = tmp / "captcha.npz"
    np.savez(data, input1=np.concatenate(ocr_samples(24, seed=11)))
    note("compressing common.onnx with slimfleet (about 90 s) ...")
    compress(common_onnx(), tmp / "compressed", data=data)
    return tmp / "compressed"


def make_outdirs(tmp: Path, width: int, compressed: Path | None) -> dict[str, Path]:
    """fp32 and compressed OUTDIRs (model.onnx + sample.npz) with the same smoke sample."""
    compressed = compressed or compress_common(tmp)
    sample = np.random.default_rng(0).random((1, 1, 64, width), dtype=np.float32)
    sources = {"fp32": common_onnx(), "int8": compressed / "model.onnx"}
    dirs = {}
    for kind, source in sources.items():
        out = tmp / kind
        out.mkdir()
        np.savez(out / "sample.npz", input1=sample)
        (out / "model.onnx").write_bytes(source.read_bytes())
        dirs[kind] = out
    return dirs


def start_broker(tmp: Path) -> Mosquitto:
    """A loopback mosquitto without persistence (hundreds of MB of retained models)."""
    broker = Mosquitto(tmp / "mosquitto")
    conf = broker.conf.read_text().replace("persistence true", "persistence false")
    broker.conf.write_text(conf)
    broker.start()
    return broker


def make_fleet(tmp: Path, url: str) -> FleetConfig:
    keys = tmp / "keys"
    generate_keys(keys / "signing.key", keys / "signing.pub")
    fleet = load_fleet(REPO / "fleet.yaml", broker_url=url)
    return replace(
        fleet,
        prefix=f"slimfleet-bench/{os.getpid()}",
        private_key=keys / "signing.key",
        public_key=keys / "signing.pub",
        devices={DEVICE: {}, RSS_DEVICE: {}},
        groups={},
    )


def agent_yaml(tmp: Path, fleet: FleetConfig, url: str, store: str, device: str = DEVICE) -> Path:
    doc = {
        "device_id": device,
        "broker": url,
        "prefix": fleet.prefix,
        "public_keys": [str(fleet.public_key)],
        "store_dir": store,
        "threads": 1,
        "http": {"host": "127.0.0.1", "port": 0},
        "telemetry_interval_s": 60,
        "watch": {"window_s": 0},  # swaps alternate a fast and a slow model on purpose
    }
    path = tmp / f"{store}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Publisher:
    """Publishes the two models under fresh versions."""

    def __init__(self, fleet: FleetConfig, dirs: dict[str, Path]) -> None:
        self.fleet = fleet
        self.dirs = dirs
        self.version = 0
        self.kinds: dict[int, str] = {}

    def publish(self, kind: str) -> int:
        self.version += 1
        publish_model(self.fleet, self.dirs[kind], NAME, self.version)
        self.kinds[self.version] = kind
        return self.version

    def assign(self, version: int, rollback: bool = False, device: str = DEVICE) -> None:
        assign(self.fleet, NAME, version, devices=[device], rollback=rollback)


def wait_serving(agent: Agent, version: int, timeout: float = 300.0) -> dict[str, Any]:
    """Wait until ``version`` serves; return the agent's update timings."""
    target = {"name": NAME, "version": version}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        update = agent.last_update
        if update is not None and update["model"] == target:
            return update
        error = agent.state_document()["error"]
        if error is not None and error["model"] == target:
            sys.exit(f"the agent could not switch to {NAME}@{version}: {error['reason']}")
        time.sleep(0.02)
    sys.exit(f"{NAME}@{version} was not serving after {timeout:.0f}s")


def timed(call: Callable[[], Any], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


# -- (a) and (b) ----------------------------------------------------------------------


def bench_overhead(agent: Agent, feeds: dict[str, np.ndarray], kind: str, args) -> None:
    # The agent's own session, so the ratio is the agent's call path and nothing else:
    # two sessions of the same file differ by several % on this machine.
    session = agent.serving._active.session  # private: measuring, not using
    names = [o.name for o in session.get_outputs()]
    conn = http.client.HTTPConnection("127.0.0.1", agent.http.port, timeout=30)
    npy = io.BytesIO()
    np.save(npy, feeds["input1"])
    npy_body = npy.getvalue()
    json_body = json.dumps({"inputs": {"input1": feeds["input1"].tolist()}}).encode()

    def post(body: bytes, kind_header: str) -> None:
        conn.request("POST", "/v1/predict", body, {"Content-Type": kind_header})
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            sys.exit(f"HTTP predict failed: {answer.status} {data[:200]!r}")

    calls = {
        "bare": lambda: session.run(names, feeds),
        "agent": lambda: agent.infer(feeds),
        "http_npy": lambda: post(npy_body, "application/x-npy"),
        "http_json": lambda: post(json_body, "application/json"),
    }
    samples: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for i in range(3 + args.runs * args.repeats):  # round robin: drift hits every path alike
        order.reverse()  # and neither always runs first
        for key in order:
            if key == "http_json" and i % 4:
                continue  # slow; a quarter of the samples is plenty
            started = time.perf_counter()
            calls[key]()
            if i >= 3:  # the first rounds warm up
                samples[key].append(time.perf_counter() - started)
    conn.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    paired = statistics.median(
        a / b for a, b in zip(samples["agent"], samples["bare"], strict=True)
    )
    say(
        f"(a) in-process infer / bare session.run [{kind}]: {paired:.3f} (goal <= 1.05)  "
        f"agent {ms(med['agent'])}, bare {ms(med['bare'])} (median of {len(samples['agent'])} "
        "paired calls, same session)"
    )
    say(
        f"(b) HTTP predict overhead [{kind}, .npy body]: {ms(med['http_npy'] - med['agent'])} "
        f"over in-process  (HTTP {ms(med['http_npy'])}, in-process {ms(med['agent'])})"
    )
    say(
        f"(b) HTTP predict overhead [{kind}, JSON body]: {ms(med['http_json'] - med['agent'])} "
        f"over in-process  (HTTP {ms(med['http_json'])}; {feeds['input1'].size} floats in, "
        f"{len(samples['http_json'])} samples)"
    )


# -- (c) ------------------------------------------------------------------------------


class Clients:
    """``CLIENTS`` threads calling agent.infer non-stop; every request is recorded."""

    def __init__(self, agent: Agent, feeds: dict[str, np.ndarray]) -> None:
        self.agent = agent
        self.feeds = feeds
        self.stop = threading.Event()
        self.records: list[tuple[float, float, bool]] = []  # (start, latency, ok)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def _run(self) -> None:
        mine = []
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.agent.infer(self.feeds)
                ok = True
            except Exception:
                ok = False
            mine.append((started, time.perf_counter() - started, ok))
        with self.lock:
            self.records += mine

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def between(self, spans: list[tuple[float, float]]) -> list[tuple[float, float, bool]]:
        return [r for r in self.records if any(a <= r[0] < b for a, b in spans)]


def bare_load(model: Path, feeds: dict[str, np.ndarray]) -> float:
    """Seconds to load a session and run it once (the warm-up)."""
    began = time.perf_counter()
    session = bare_session(model)
    session.run(None, feeds)
    return time.perf_counter() - began


def bench_swaps(agent: Agent, pub: Publisher, dirs: dict[str, Path], feeds, args) -> None:
    note(f"publishing {args.swaps + 2} versions for (c)")
    steady_versions = [pub.publish("fp32"), pub.publish("int8")]
    kinds = ["fp32" if i % 2 == 0 else "int8" for i in range(args.swaps)]
    versions = [pub.publish(kind) for kind in kinds]
    pub.assign(steady_versions[0])
    wait_serving(agent, steady_versions[0])
    steady_spans: list[tuple[float, float]] = []
    swap_spans: list[tuple[float, float]] = []
    ratios: dict[str, list[float]] = {"fp32": [], "int8": []}
    parts: dict[str, list[tuple[float, ...]]] = {"fp32": [], "int8": []}
    with Clients(agent, feeds) as clients:
        note(f"steady phase: {args.steady_s / 2:.0f}s on fp32, {args.steady_s / 2:.0f}s on int8")
        for version in steady_versions:
            if agent.serving.current.version != version:
                pub.assign(version)
                wait_serving(agent, version)
            time.sleep(1.0)
            start = time.perf_counter()
            time.sleep(args.steady_s / 2)
            steady_spans.append((start, time.perf_counter()))
        note(f"{args.swaps} swaps (a download each), each followed by a bare load of that model")
        for version, kind in zip(versions, kinds, strict=True):
            began = time.perf_counter()
            pub.assign(version)
            update = wait_serving(agent, version)
            swap_spans.append((began, time.perf_counter()))
            swap_s = update["total_s"] - update["download_s"]
            # the baseline right after, under the same client load and the same served model
            ratios[kind].append(swap_s / bare_load(dirs[kind] / "model.onnx", feeds))
            parts[kind].append(
                (swap_s, update["install_s"], update["load_s"], update["activate_s"])
            )
            time.sleep(0.3)
    steady = clients.between(steady_spans)
    during = clients.between(swap_spans)
    failed = sum(not ok for *_, ok in clients.records)
    say(
        f"(c) failed requests during {args.swaps} swaps with {CLIENTS} clients: {failed} "
        f"(goal 0)  of {len(clients.records)} requests, {len(during)} of them during swaps"
    )
    p_during = p99([lat for _, lat, ok in during if ok])
    p_steady = p99([lat for _, lat, ok in steady if ok])
    say(
        f"(c) p99 during swaps / p99 steady: {p_during / p_steady:.2f} (goal <= 2)  "
        f"{ms(p_during)} vs {ms(p_steady)} ({len(during)} vs {len(steady)} requests)"
    )
    for kind in ("fp32", "int8"):
        swap_s, install, load, activate = (
            statistics.median(p[i] for p in parts[kind]) for i in range(4)
        )
        ratio = statistics.median(ratios[kind])
        say(
            f"(c) swap time (manifest seen -> serving, minus download) / bare load + warm-up "
            f"[{kind}]: {ratio:.2f} (goal <= 1.2)  {ms(swap_s)} vs {ms(swap_s / ratio)} "
            f"(median of {len(ratios[kind])} swaps, each paired with a bare load right after, "
            f"both under the {CLIENTS}-client load)"
        )
        note(
            f"{kind} swap: install {ms(install)}, load {ms(load)}, smoke test + swap "
            f"{ms(activate - load)}, the rest (manifest checks, events) "
            f"{ms(swap_s - install - activate)}"
        )


# -- (d) ------------------------------------------------------------------------------


def bench_delivery(agent: Agent, pub: Publisher, broker: Mosquitto, tmp: Path, args) -> None:
    rates = []
    size = 0
    for _ in range(args.deliveries):
        version = pub.publish("fp32")
        pub.assign(version)
        update = wait_serving(agent, version)
        size = update["bytes"]
        rates.append(size / update["download_s"])
    chunks = -(-size // DEFAULT_CHUNK_SIZE)
    chunk_file = tmp / "chunk.bin"
    chunk_file.write_bytes((pub.dirs["fp32"] / "model.onnx").read_bytes()[:DEFAULT_CHUNK_SIZE])
    baseline = [mosquitto_pub_rate(broker, chunk_file, chunks) for _ in range(args.deliveries)]
    agent_rate, pub_rate = statistics.median(rates), statistics.median(baseline)
    say(
        f"(d) delivery throughput agent / mosquitto_pub: {agent_rate / pub_rate:.2f} (goal >= 0.5)"
        f"  {agent_rate / MB:.1f} MB/s vs {pub_rate / MB:.1f} MB/s "
        f"({size / MB:.1f} MB in {chunks} chunks of {DEFAULT_CHUNK_SIZE // 1024} KiB, QoS 1, "
        f"medians of {len(rates)})"
    )


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


# -- (e) ------------------------------------------------------------------------------


def bench_memory(fleet: FleetConfig, pub: Publisher, url: str, tmp: Path, args) -> None:
    config = agent_yaml(tmp, fleet, url, "store-rss", RSS_DEVICE)
    low, high = pub.publish("fp32"), pub.publish("fp32")  # the same bytes twice
    exe = Path(sys.executable).with_name("slimfleet-agent")
    proc = subprocess.Popen([str(exe), "--config", str(config)], stderr=subprocess.DEVNULL)
    watcher = Link(BrokerSettings.from_url(url), f"bench-watch-{os.getpid()}")
    events = watcher.subscribe([fleet.topics.device(RSS_DEVICE, "events")])
    watcher.start()
    try:
        process = psutil.Process(proc.pid)
        time.sleep(5.0)  # started, connected, idle
        rss_empty = process.memory_info().rss

        def swap(version: int, rollback: bool) -> None:
            pub.assign(version, rollback=rollback, device=RSS_DEVICE)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                msg = events.get(timeout=1)
                if msg is None:
                    continue
                event = json.loads(msg.payload)
                if event["model"] == {"name": NAME, "version": version}:
                    if event["type"] == "swap_ok":
                        return
                    if event["type"] in ("fallback", "swap_failed"):
                        sys.exit(f"swap to {version} failed: {event}")
            sys.exit(f"no swap to {NAME}@{version}")

        swap(low, False)  # the first model: a load, not yet a swap
        for i in range(args.rss_swaps):
            if i % 2 == 0:
                swap(high, rollback=False)
            else:
                swap(low, rollback=True)
            if i == 0:
                time.sleep(1.0)
                rss_first = process.memory_info().rss
        time.sleep(1.0)
        rss_last = process.memory_info().rss
    finally:
        watcher.stop()
        proc.terminate()
        proc.wait(timeout=30)
    footprint = session_footprint(pub.dirs["fp32"])
    growth = rss_last - rss_first
    say(
        f"(e) RSS after {args.rss_swaps} swaps - after the first / one session's footprint: "
        f"{growth / footprint:.1%} (goal < 10%)  {growth / MB:+.1f} MB vs {footprint / MB:.1f} MB "
        f"(RSS {rss_first / MB:.1f} -> {rss_last / MB:.1f} MB; fp32, two versions alternating)"
    )
    say(f"(e) agent RSS with no model loaded: {rss_empty / MB:.1f} MB")


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


# -- main -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=160, help="captcha image width")
    parser.add_argument(
        "--compressed", type=Path, help="a 'slimfleet compress' OUTDIR for common.onnx"
    )
    parser.add_argument("--runs", type=int, default=40, help="timed calls per block in (a)/(b)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks in (a)/(b)")
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--steady-s", type=float, default=8.0, help="steady phase of (c)")
    parser.add_argument("--deliveries", type=int, default=3, help="downloads timed in (d)")
    parser.add_argument("--rss-swaps", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slimfleet-bench-") as name:
        tmp = Path(name)
        dirs = make_outdirs(tmp, args.width, args.compressed)
        sizes = {k: (d / "model.onnx").stat().st_size / MB for k, d in dirs.items()}
        say(
            f"models: common.onnx fp32 {sizes['fp32']:.1f} MB, int8 (slimfleet compress's "
            f"choice) {sizes['int8']:.1f} MB; input 1x1x64x{args.width}; "
            f"1 onnxruntime thread; {os.cpu_count()} cores"
        )
        feeds = dict(np.load(dirs["fp32"] / "sample.npz"))
        broker = start_broker(tmp)
        try:
            fleet = make_fleet(tmp, broker.url)
            pub = Publisher(fleet, dirs)
            agent = Agent(load_agent_config(agent_yaml(tmp, fleet, broker.url, "store")))
            agent.start()
            try:
                for kind in ("fp32", "int8"):
                    version = pub.publish(kind)
                    pub.assign(version)
                    wait_serving(agent, version)
                    bench_overhead(agent, feeds, kind, args)
                bench_swaps(agent, pub, dirs, feeds, args)
                bench_delivery(agent, pub, broker, tmp, args)
            finally:
                agent.stop()
            bench_memory(fleet, pub, broker.url, tmp, args)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
