"""What watching the fleet costs: ``slimfleet exporter`` and ``slimfleet status`` against N
devices' telemetry through a real mosquitto (issue 9, items 3, 4 and the ingest part of 7).

For each N (25, 100, 200 by default) a publisher plays N devices: a retained schema-2
state and status each, then telemetry (two slots, one a two-tier chain) every
``--interval`` seconds, as agents would. Measured:

* the exporter process's CPU over the window, in % of one core, and whether it ingested
  every message sent (its ``slimfleet_slot_requests_total`` adds up what it received);
* its capacity: a burst of telemetry as fast as one publisher can send it, timed until
  the exporter has counted all of it (messages per second, CPU microseconds per message);
* the median time of a ``/metrics`` scrape at N devices;
* ``slimfleet status --json --wait W``: wall time and CPU (the child's rusage).

Figures are printed per N so that their growth with N shows. Goal (issue 9): the exporter
keeps up with 200 devices at a 1 s telemetry interval on one core.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]
from brokers import Mosquitto, free_port, wait_port  # noqa: E402  (the tests' launcher)
from reportdocs import RUN, state_doc, telemetry_doc, write_fleet_file  # noqa: E402

PREFIX = "bench/watch"
SLOTS = {"det": {"requests": 10}, "rec": {"requests": 10, "tiers": 2, "escalations": 3}}
PER_MESSAGE = 20  # requests a telemetry message adds to the exporter's counters


def client(url_port: int) -> mqtt.Client:
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-{free_port()}"
    )
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    return c


def device_topic(device: str, leaf: str) -> str:
    return f"{PREFIX}/devices/{device}/{leaf}"


def telemetry(device: str) -> bytes:
    return json.dumps(telemetry_doc(device, slots=SLOTS)).encode()


def counted(port: int) -> float:
    """Requests the exporter has counted over every device and slot."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("slimfleet_slot_requests_total{")
    )


def wait_counted(port: int, expected: float, quiet_s: float = 3.0) -> tuple[float, float]:
    """Poll the exporter until it has counted ``expected`` or its count stopped moving for
    ``quiet_s`` (messages lost); return the count and the time it last moved."""
    got, moved = counted(port), time.perf_counter()
    while got < expected and time.perf_counter() - moved < quiet_s:
        time.sleep(0.05)
        now = counted(port)
        if now != got:
            got, moved = now, time.perf_counter()
    return got, moved


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def run(n: int, interval: float, window: float, burst: int, wait: float, workdir: Path) -> dict:
    broker = Mosquitto(workdir / f"mosquitto-{n}")
    broker.start()
    exporter = None
    try:
        fleet_file = write_fleet_file(workdir / f"fleet-{n}", PREFIX, broker.url)
        pub = client(broker.port)
        devices = [f"dev-{i:04d}" for i in range(n)]
        for d in devices:
            pub.publish(device_topic(d, "state"), json.dumps(state_doc(d)), qos=1, retain=True)
            pub.publish(device_topic(d, "status"), b"online", qos=1, retain=True)
        port = free_port()
        exporter = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RUN,
                "exporter",
                "--fleet",
                str(fleet_file),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stderr=subprocess.DEVNULL,
        )
        wait_port(port, 60)
        proc = psutil.Process(exporter.pid)
        time.sleep(1)

        # steady: every device once per interval, spread over the interval
        start_cpu, sent = cpu_s(proc), 0
        stop = time.monotonic() + window
        while time.monotonic() < stop:
            tick = time.monotonic()
            for d in devices:
                pub.publish(device_topic(d, "telemetry"), telemetry(d))
                sent += 1
            time.sleep(max(0.0, interval - (time.monotonic() - tick)))
        got, _ = wait_counted(port, sent * PER_MESSAGE)
        steady_cpu = (cpu_s(proc) - start_cpu) / window * 100

        scrapes = []
        for _ in range(5):
            t = time.perf_counter()
            counted(port)
            scrapes.append(time.perf_counter() - t)

        # burst: as fast as one publisher sends
        base = got
        bodies = [(device_topic(d, "telemetry"), telemetry(d)) for d in devices]
        start_cpu, t0 = cpu_s(proc), time.perf_counter()
        for i in range(burst):
            pub.publish(*bodies[i % n])
        burst_got, last = wait_counted(port, base + burst * PER_MESSAGE)
        burst_cpu = cpu_s(proc) - start_cpu
        burst_s = last - t0

        # status: N devices publishing every interval while it waits
        live = threading.Event()

        def keep_publishing() -> None:
            while not live.wait(interval):
                for d in devices:
                    pub.publish(device_topic(d, "telemetry"), telemetry(d))

        thread = threading.Thread(target=keep_publishing, daemon=True)
        thread.start()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                RUN,
                "status",
                "--fleet",
                str(fleet_file),
                "--json",
                "--wait",
                f"{wait}s",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        status_wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        live.set()
        thread.join()
        rows = json.loads(result.stdout)["devices"] if result.returncode == 0 else []
        pub.loop_stop()
        pub.disconnect()
        return {
            "n": n,
            "offered_msgs_s": n / interval,
            "exporter_cpu_pct": steady_cpu,
            "ingested": got / PER_MESSAGE / sent,
            "scrape_ms": statistics.median(scrapes) * 1000,
            "burst_msgs_s": (burst_got - base) / PER_MESSAGE / burst_s,
            "burst_ingested": (burst_got - base) / PER_MESSAGE / burst,
            "burst_cpu_us_msg": burst_cpu / max(1, (burst_got - base) / PER_MESSAGE) * 1e6,
            "status_wall_s": status_wall,
            "status_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "status_rows_with_telemetry": sum(1 for r in rows if r["slots"]),
        }
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait(20)
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="25,100,200", help="comma-separated N")
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry interval, s")
    parser.add_argument("--window", type=float, default=10.0, help="steady window, s")
    parser.add_argument("--burst", type=int, default=20000, help="messages in the burst")
    parser.add_argument("--wait", type=float, default=3.0, help="status --wait, s")
    args = parser.parse_args()
    header = (
        f"{'N':>5} {'offered/s':>9} {'exp CPU%':>8} {'ingested':>8} {'scrape ms':>9} "
        f"{'burst/s':>8} {'(got)':>7} {'us/msg':>7} {'status s':>8} {'status CPU s':>12} {'rows':>5}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.devices.split(",")):
            r = run(n, args.interval, args.window, args.burst, args.wait, Path(tmp))
            print(
                f"{r['n']:>5} {r['offered_msgs_s']:>9.0f} {r['exporter_cpu_pct']:>8.1f} "
                f"{r['ingested']:>8.1%} {r['scrape_ms']:>9.1f} {r['burst_msgs_s']:>8.0f} {r['burst_ingested']:>7.1%} "
                f"{r['burst_cpu_us_msg']:>7.0f} {r['status_wall_s']:>8.2f} "
                f"{r['status_cpu_s']:>12.2f} {r['status_rows_with_telemetry']:>5}",
                flush=True,
            )


if __name__ == "__main__":
    main()
