"""N simulated devices against a real mosquitto on one machine (issue 9, item 7).

For N = 25, 100 and 200 (``--sizes``), every device is a real agent (its real classes,
store and wire format, HTTP off, telemetry every second), ``--per-process`` of them per
worker process (bench/fleet_sim.py). For each N it measures:

- rollout time: from ``assign`` of a 10 MB model to the whole group (signing and
  publishing N desired states) until the last device serves it;
- broker bytes: mosquitto's ``$SYS/broker/bytes/sent`` over the rollout / (N x model
  size) (1.0 = each device got the model once; telemetry and state are in it too);
- telemetry ingest: messages per second that ``status``'s FleetView and the exporter
  (FleetView + a Prometheus collect every second) take in over ``--ingest-s`` seconds,
  and the CPU share of each (one process each, so 100% = one core);
- the agent's memory per device: worker RSS / agents, idle (connected, no model) and
  serving.

Then how each figure grows with N (ratios against the smallest N). Loopback only;
bounded: each rollout waits at most ``--timeout-s``. Run::

    nice -n 5 python bench/fleet_bench.py     # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from agent_rig import (
    MB,
    Mosquitto,
    Publisher,
    agent_doc,
    growth_line,
    make_fleet,
    note,
    say,
    scaling,
    start_broker,
    write_yaml,
)
from fleet_sim import run_worker
from onnx import TensorProto, helper, numpy_helper

from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.exporter import FleetCollector
from slimfleet.host.fleet.fleetview import FleetView
from slimfleet.host.fleet.watch import FleetFeed, report_filters

NAME = "fleetbench"
WIDTH = 1600  # a 1600 x 1600 float32 weight: 10.24 MB


def build_model(out: Path) -> Path:
    """An OUTDIR with a 10 MB model (one MatMul) and its smoke sample."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight = rng.random((WIDTH, WIDTH), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "fleetbench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, out / "model.onnx")
    np.savez(out / "sample.npz", x=rng.random((1, WIDTH), dtype=np.float32))
    return out


def broker_bytes_sent(broker: Mosquitto) -> int:
    """mosquitto's $SYS/broker/bytes/sent (refreshed every second: sys_interval 1)."""
    time.sleep(1.2)
    done = subprocess.run(
        ["mosquitto_sub", "-p", str(broker.port), "-t", "$SYS/broker/bytes/sent", "-C", "1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return int(done.stdout.strip())


def ingest_probe(fleet: FleetConfig, exporter: bool, seconds: float, out) -> None:
    """Feed a FleetView from the broker for ``seconds`` (after the retained reports); with
    ``exporter``, build the Prometheus families every second as a scrape would. Sends
    (telemetry messages, all messages, CPU seconds, wall seconds)."""
    view = FleetView(fleet.topics, list(fleet.devices))
    counts = {"all": 0, "telemetry": 0}

    def ingest(topic: str, payload: bytes) -> None:
        view.ingest(topic, payload)
        counts["all"] += 1
        counts["telemetry"] += topic.endswith("/telemetry")

    with FleetFeed(fleet.broker, ingest) as feed:
        feed.subscribe(report_filters(fleet.topics))
        collector = FleetCollector(view, feed.connected)
        seen, cpu, began = dict(counts), time.process_time(), time.monotonic()
        while time.monotonic() - began < seconds:
            time.sleep(1.0)
            if exporter:
                for _ in collector.collect():
                    pass
        wall, cpu = time.monotonic() - began, time.process_time() - cpu
    out.send((counts["telemetry"] - seen["telemetry"], counts["all"] - seen["all"], cpu, wall))


def run_size(n: int, fleet: FleetConfig, pub: Publisher, broker: Mosquitto, tmp: Path, args):
    """One fleet of ``n`` devices: its figures as a dict."""
    devices = [f"sim-{i:04d}" for i in range(n)]
    fleet = replace(fleet, prefix=f"{fleet.prefix}/n{n}", devices={d: {} for d in devices})
    pub = Publisher(fleet, pub.dirs, NAME)
    version = pub.publish("model")
    size = (pub.dirs["model"] / "model.onnx").stat().st_size
    configs = []
    for device in devices:
        doc = agent_doc(
            fleet, broker.url, device, tmp / f"n{n}" / device, http=None, telemetry_interval_s=1
        )
        (tmp / f"n{n}").mkdir(exist_ok=True)
        configs.append(str(write_yaml(tmp / f"n{n}" / f"{device}.yaml", doc)))
    spawn = multiprocessing.get_context("spawn")
    workers = []
    for start in range(0, n, args.per_process):
        ours, theirs = spawn.Pipe()
        proc = spawn.Process(
            target=run_worker, args=(configs[start : start + args.per_process], theirs)
        )
        proc.start()
        workers.append((proc, ours, len(configs[start : start + args.per_process])))
    try:
        ready = [conn.recv() for _, conn, _ in workers]
        idle = sum(r[2] - r[1] for r in ready) / n
        time.sleep(2.0)  # every agent connected and subscribed
        sent_before = broker_bytes_sent(broker)
        began = time.time()
        seqs = pub.assign(version, devices)
        assigned = time.time() - began
        for _, conn, _ in workers:
            conn.send(("watch", seqs, args.timeout_s))
        answers = [conn.recv() for _, conn, _ in workers]
        late = [d for kind, value in answers if kind == "late" for d in value]
        if late:
            raise SystemExit(f"N={n}: {len(late)} devices not serving after {args.timeout_s}s")
        rollout = max(value for _, value in answers) - began
        sent = broker_bytes_sent(broker) - sent_before
        serving = 0
        for (_, conn, _count), first in zip(workers, ready, strict=True):
            conn.send(("rss",))
            serving += conn.recv()[1] - first[1]
        ingest = probe_ingest(fleet, args.ingest_s)
    finally:
        for proc, conn, _ in workers:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    figures = {
        "rollout_s": rollout,
        "assign_s": assigned,
        "bytes_ratio": sent / (n * size),
        "idle_mb": idle / MB,
        "serving_mb": serving / n / MB,
        **ingest,
    }
    say(
        f"N={n}: rollout {rollout:.2f} s (assign {assigned:.2f} s), broker sent "
        f"{sent / MB:.0f} MB = {figures['bytes_ratio']:.2f} x N x {size / MB:.1f} MB, "
        f"status {ingest['status_rate']:.0f} telemetry msg/s at {ingest['status_cpu']:.1%} CPU, "
        f"exporter {ingest['exporter_rate']:.0f} msg/s at {ingest['exporter_cpu']:.1%} CPU "
        f"(expected {n / 1.0:.0f}/s), agent memory {figures['idle_mb']:.1f} MB/device idle, "
        f"{figures['serving_mb']:.1f} MB/device serving"
    )
    return figures


def probe_ingest(fleet: FleetConfig, seconds: float) -> dict[str, float]:
    """Run the status and exporter probes side by side, one process each."""
    spawn = multiprocessing.get_context("spawn")
    figures = {}
    running = []
    for label, exporter in (("status", False), ("exporter", True)):
        ours, theirs = spawn.Pipe()
        proc = spawn.Process(target=ingest_probe, args=(fleet, exporter, seconds, theirs))
        proc.start()
        running.append((label, proc, ours))
    for label, proc, conn in running:
        if not conn.poll(seconds + 60):
            proc.kill()
            raise SystemExit(f"the {label} probe did not answer")
        telemetry, _, cpu, wall = conn.recv()
        proc.join(10)
        figures[f"{label}_rate"] = telemetry / wall
        figures[f"{label}_cpu"] = cpu / wall
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25,100,200", help="fleet sizes N, comma-separated")
    parser.add_argument("--per-process", type=int, default=50, help="agents per worker process")
    parser.add_argument("--ingest-s", type=float, default=10.0, help="telemetry ingest window")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="rollout time limit")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="slimfleet-fleetbench-") as name:
        tmp = Path(name)
        dirs = {"model": build_model(tmp / "model")}
        broker = start_broker(tmp, sys_interval=1)
        try:
            fleet = make_fleet(tmp, broker.url, [])
            pub = Publisher(fleet, dirs, NAME)
            results = {}
            for n in sizes:
                note(f"N={n}: starting {n} agents in {math.ceil(n / args.per_process)} processes")
                results[n] = run_size(n, fleet, pub, broker, tmp, args)
        finally:
            broker.stop()
    report(results)


def report(results: dict[int, dict[str, float]]) -> None:
    """How each figure grows with N."""
    pick = {key: {n: r[key] for n, r in results.items()} for key in next(iter(results.values()))}
    for key in ("status_cpu", "exporter_cpu"):
        pick[key] = {n: v * 100 for n, v in pick[key].items()}
    lines = [
        ("rollout time", "rollout_s", " s"),
        ("broker bytes / (N x model)", "bytes_ratio", ""),
        ("status telemetry msg/s", "status_rate", "/s"),
        ("exporter telemetry msg/s", "exporter_rate", "/s"),
        ("status CPU % of a core", "status_cpu", " %"),
        ("exporter CPU % of a core", "exporter_cpu", " %"),
        ("agent memory/device serving", "serving_mb", " MB"),
    ]
    for label, key, unit in lines:
        say(growth_line(f"growth {label}", pick[key], unit))
    say(f"rollout time against N: {scaling(pick['rollout_s'])} (goal: linear or better)")
    total = {n: r["bytes_ratio"] * n for n, r in results.items()}
    say(f"broker bytes against N: {scaling(total)} (goal: linear or better)")
    biggest = max(results)
    cpu = results[biggest]["exporter_cpu"]
    say(
        f"exporter at N={biggest}, 1 s telemetry: {results[biggest]['exporter_rate']:.0f} msg/s "
        f"of {biggest}/s at {cpu:.1%} of one core (goal: keeps up on one core)"
    )


if __name__ == "__main__":
    main()
