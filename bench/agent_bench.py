"""The edge agent against bare onnxruntime and mosquitto's own clients (issue 3 item 7,
issue 7 item 5).

On ddddocr's ``common.onnx`` (fp32) and an int8 version, every ratio measured against a
baseline taken in the same run:

(a) agent in-process ``infer`` / bare ``session.run`` (same session), medians;
(b) local HTTP OIP v2 (``POST /v2/models/main/infer``) overhead over in-process, in ms,
    with the binary tensor data extension and with JSON tensors;
(c) 20 swaps (each a download of a new version) while 4 client threads call ``infer``
    non-stop: failed requests, p99 during swaps / p99 steady, and swap time (desired
    state seen -> new deployment serving, minus the download) / bare onnxruntime load +
    warm-up (both under the same 4-client load), with where the swap spends its time
    (install, load, smoke test + switch, the rest: manifest checks, state and events);
(d) delivery throughput through loopback mosquitto / ``mosquitto_pub`` -> ``mosquitto_sub``
    sending the same number of bytes in the same chunk size;
(e) RSS growth of an agent process from its first swap to its 50th (two versions of
    the fp32 model alternating) against one session's footprint (measured in a fresh
    process), and the agent's RSS with no model loaded.

The int8 model is onnxruntime's ``quantize_dynamic`` of common.onnx (MatMul, Gemm and
LSTM weights to int8; what ``slimfleet compress`` picks at a loose fidelity), or an
existing compress OUTDIR given with ``--compressed``. Run::

    nice -n 5 python bench/agent_bench.py     # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from agent_rig import (
    MB,
    Mosquitto,
    Publisher,
    agent_doc,
    breakdown,
    make_fleet,
    mosquitto_pub_rate,
    ms,
    note,
    say,
    session_footprint,
    start_broker,
    wait_serving,
    write_yaml,
)
from benchlib import session as bare_session  # the agent's session options

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent
from slimfleet.agent.link import Link
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.wire import DEFAULT_CHUNK_SIZE
from slimfleet.host.fleet.config import FleetConfig

DEVICE = "bench-01"  # the in-process agent
RSS_DEVICE = "bench-02"  # the agent process of (e), a fresh device
NAME = "ocr"
CLIENTS = 4


# -- setup --------------------------------------------------------------------------


def common_onnx() -> Path:
    try:
        import ddddocr
    except ImportError:
        sys.exit("ddddocr is not installed: pip install '.[bench]' (it ships common.onnx)")
    path = Path(ddddocr.__file__).parent / "common.onnx"
    if not path.is_file():
        sys.exit(f"{path} is missing from the ddddocr package")
    return path


def quantize_common(tmp: Path) -> Path:
    """common.onnx with MatMul/Gemm/LSTM weights quantized to int8 (dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / "int8-source.onnx"
    quantize_dynamic(
        common_onnx(),
        out,
        op_types_to_quantize=["MatMul", "Gemm", "LSTM"],
        weight_type=QuantType.QInt8,
    )
    return out


def make_outdirs(tmp: Path, width: int, compressed: Path | None) -> dict[str, Path]:
    """fp32 and int8 OUTDIRs (model.onnx + sample.npz) with the same smoke sample."""
    int8 = compressed / "model.onnx" if compressed else quantize_common(tmp)
    sample = np.random.default_rng(0).random((1, 1, 64, width), dtype=np.float32)
    dirs = {}
    for kind, source in {"fp32": common_onnx(), "int8": int8}.items():
        out = tmp / kind
        out.mkdir()
        np.savez(out / "sample.npz", input1=sample)
        (out / "model.onnx").write_bytes(source.read_bytes())
        dirs[kind] = out
    return dirs


def swap_to(agent: Agent, pub: Publisher, version: int) -> dict[str, Any]:
    """Assign ``version`` to the in-process agent (rolling back when lower); its figures."""
    rollback = version < _serving_version(agent)
    seqs = pub.assign(version, [DEVICE], rollback=rollback)
    return wait_serving(agent, seqs[DEVICE])


def _serving_version(agent: Agent) -> int:
    current = agent.state.current or {}
    spec = current.get("main")
    return spec.models[0].version if spec else 0


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


# -- (a) and (b) ----------------------------------------------------------------------


def bench_overhead(agent: Agent, feeds: dict[str, np.ndarray], kind: str, args) -> None:
    # The agent's own session, so the ratio is the agent's call path and nothing else:
    # two sessions of the same file differ by several % on this machine.
    with agent.server.pinned() as pinned:  # private: measuring, not using
        model = pinned.serving.slots["main"].primary
    session, names = model._session, model.output_names
    conn = http.client.HTTPConnection("127.0.0.1", agent.http.port, timeout=30)
    array = feeds["input1"]
    tensor = {"name": "input1", "shape": list(array.shape), "datatype": "FP32"}
    head = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": array.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    binary_body = head + array.tobytes()
    binary_headers = {"Inference-Header-Content-Length": str(len(head))}
    json_body = json.dumps({"inputs": [{**tensor, "data": array.reshape(-1).tolist()}]}).encode()

    def post(body: bytes, headers: dict[str, str]) -> None:
        conn.request("POST", "/v2/models/main/infer", body, headers)
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            sys.exit(f"HTTP infer failed: {answer.status} {data[:200]!r}")

    calls = {
        "bare": lambda: session.run(names, feeds),
        "agent": lambda: agent.infer(feeds),
        "http_bin": lambda: post(binary_body, binary_headers),
        "http_json": lambda: post(json_body, {"Content-Type": "application/json"}),
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
    out_floats = sum(a.size for a in agent.infer(feeds).values())
    paired = statistics.median(
        a / b for a, b in zip(samples["agent"], samples["bare"], strict=True)
    )
    say(
        f"(a) in-process infer / bare session.run [{kind}]: {paired:.3f} (goal <= 1.05)  "
        f"agent {ms(med['agent'])}, bare {ms(med['bare'])} (median of {len(samples['agent'])} "
        "paired calls, same session)"
    )
    say(
        f"(b) HTTP OIP v2 overhead [{kind}, binary tensors]: "
        f"{ms(med['http_bin'] - med['agent'])} over in-process  "
        f"(HTTP {ms(med['http_bin'])}, in-process {ms(med['agent'])})"
    )
    say(
        f"(b) HTTP OIP v2 overhead [{kind}, JSON tensors]: "
        f"{ms(med['http_json'] - med['agent'])} over in-process  (HTTP {ms(med['http_json'])}; "
        f"{feeds['input1'].size} floats in, {out_floats} out, "
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


class SwapClock:
    """Private hooks on one agent, for the swap breakdown (measuring, not using): wraps
    the event callback (seconds spent publishing events; the smoke run's time from the
    last ``swap_ok``, its latency: one run, as the bench sets no latency budget) and
    ``updater.prepare`` (manifest fetch and checks + download + install)."""

    def __init__(self, agent: Agent) -> None:
        self.on_event = agent.server._on_event
        self.prepare = agent.updater.prepare
        self.smoke_s = self.events_s = self.prepare_s = 0.0
        agent.server._on_event = self._event
        agent.updater.prepare = self._prepare

    def _event(self, event: dict[str, Any]) -> None:
        began = time.perf_counter()
        self.on_event(event)
        self.events_s += time.perf_counter() - began
        if event["type"] == "swap_ok":
            self.smoke_s = event["smoke_ms"] / 1000

    def _prepare(self, desired: Any) -> Any:
        began = time.perf_counter()
        try:
            return self.prepare(desired)
        finally:
            self.prepare_s = time.perf_counter() - began

    def reset(self) -> None:
        self.smoke_s = self.events_s = self.prepare_s = 0.0


def swap_parts(update: dict[str, Any], clock: SwapClock) -> dict[str, float]:
    """Where one swap's time went (seconds); the first entry is the whole swap."""
    swap_s = update["total_s"] - update["download_s"]
    activate = update["activate_s"]
    prepare = clock.prepare_s - update["download_s"]  # manifest fetch + checks + install
    return {
        "swap": swap_s,
        "manifest": prepare - update["install_s"],
        "install": update["install_s"],
        "load": update["load_s"],
        "warm-up run": clock.smoke_s,
        "switch": activate - update["load_s"] - clock.smoke_s,
        "state": swap_s - prepare - activate,  # state.json, desired.json, prune, publish
        "events": clock.events_s,
    }


def bench_swaps(agent: Agent, pub: Publisher, dirs: dict[str, Path], feeds, args) -> None:
    note(f"publishing {args.swaps + 2} versions for (c)")
    steady_versions = [pub.publish("fp32"), pub.publish("int8")]
    kinds = ["fp32" if i % 2 == 0 else "int8" for i in range(args.swaps)]
    versions = [pub.publish(kind) for kind in kinds]
    swap_to(agent, pub, steady_versions[0])
    steady_spans: list[tuple[float, float]] = []
    swap_spans: list[tuple[float, float]] = []
    ratios: dict[str, list[float]] = {"fp32": [], "int8": []}
    parts: dict[str, dict[str, list[float]]] = {"fp32": {}, "int8": {}}
    clock = SwapClock(agent)
    with Clients(agent, feeds) as clients:
        note(f"steady phase: {args.steady_s / 2:.0f}s on fp32, {args.steady_s / 2:.0f}s on int8")
        for version in steady_versions:
            if _serving_version(agent) != version:
                swap_to(agent, pub, version)
            time.sleep(1.0)
            start = time.perf_counter()
            time.sleep(args.steady_s / 2)
            steady_spans.append((start, time.perf_counter()))
        note(f"{args.swaps} swaps (a download each), each preceded by a bare load of that model")
        for version, kind in zip(versions, kinds, strict=True):
            # the baseline right before, under the same client load on the same served
            # model as the swap (after it, the clients would run the new model: lighter
            # for int8, heavier for fp32, which skews the ratio both ways)
            bare = bare_load(dirs[kind] / "model.onnx", feeds)
            time.sleep(0.3)
            clock.reset()
            began = time.perf_counter()
            update = swap_to(agent, pub, version)
            swap_spans.append((began, time.perf_counter()))
            for key, value in swap_parts(update, clock).items():
                parts[kind].setdefault(key, []).append(value)
            ratios[kind].append(parts[kind]["swap"][-1] / bare)
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
        swap_s = statistics.median(parts[kind]["swap"])
        ratio = statistics.median(ratios[kind])
        say(
            f"(c) swap time (desired seen -> serving, minus download) / bare load + warm-up "
            f"[{kind}]: {ratio:.2f} (goal <= 1.2)  {ms(swap_s)} vs {ms(swap_s / ratio)} "
            f"(median of {len(ratios[kind])} swaps, each paired with a bare load right before, "
            f"both under the {CLIENTS}-client load)"
        )
        fetched = zip(ratios[kind], parts[kind]["manifest"], parts[kind]["swap"], strict=True)
        after = statistics.median(r * (1 - m / s) for r, m, s in fetched)
        say(
            "(c) swap time (manifest fetched and checked -> serving, minus download: issue 7's"
            f" 'manifest seen') / bare load + warm-up [{kind}]: {after:.2f} (goal <= 1.2)"
        )
        say(
            f"(c) {kind} swap breakdown (medians; events are inside the other parts): "
            f"{breakdown(parts[kind])}"
        )


# -- (d) ------------------------------------------------------------------------------


def bench_delivery(agent: Agent, pub: Publisher, broker: Mosquitto, tmp: Path, args) -> None:
    rates = []
    size = 0
    for _ in range(args.deliveries):
        update = swap_to(agent, pub, pub.publish("fp32"))
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


# -- (e) ------------------------------------------------------------------------------


def bench_memory(fleet: FleetConfig, pub: Publisher, url: str, tmp: Path, args) -> None:
    doc = agent_doc(fleet, url, RSS_DEVICE, tmp / "store-rss", http=None)
    config = write_yaml(tmp / "agent-rss.yaml", doc)
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
            seq = pub.assign(version, [RSS_DEVICE], rollback=rollback)[RSS_DEVICE]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                msg = events.get(timeout=1)
                if msg is None:
                    continue
                event = json.loads(msg.payload)
                if event.get("seq") != seq:
                    continue
                if event["type"] == "swap_ok":
                    return
                if event["type"] in ("swap_failed", "desired_refused"):
                    sys.exit(f"swap to {NAME}@{version} failed: {event}")
            sys.exit(f"no swap to {NAME}@{version} (desired seq {seq}) within 120 s")

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


# -- main -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=160, help="captcha image width")
    parser.add_argument(
        "--compressed", type=Path, help="a 'slimfleet compress' OUTDIR (default: quantize_dynamic)"
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
        int8_from = "--compressed" if args.compressed else "quantize_dynamic MatMul/Gemm/LSTM"
        say(
            f"models: common.onnx fp32 {sizes['fp32']:.1f} MB, int8 ({int8_from}) "
            f"{sizes['int8']:.1f} MB; input 1x1x64x{args.width}; "
            f"1 onnxruntime thread; {os.cpu_count()} cores"
        )
        feeds = dict(np.load(dirs["fp32"] / "sample.npz"))
        broker = start_broker(tmp)
        try:
            fleet = make_fleet(tmp, broker.url, [DEVICE, RSS_DEVICE])
            pub = Publisher(fleet, dirs, NAME)
            doc = agent_doc(fleet, broker.url, DEVICE, tmp / "store")
            agent = Agent(load_agent_config(write_yaml(tmp / "agent.yaml", doc)))
            agent.start()
            try:
                for kind in ("fp32", "int8"):
                    swap_to(agent, pub, pub.publish(kind))
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
