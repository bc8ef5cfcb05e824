"""Ordinary clients' latency while hostile clients post huge JSON bodies (issue 8, HTTP).

An agent-like server runs in a process of its own: :class:`slimfleet.agent.serve.HttpApi`
with its default limits over a real onnxruntime session of a ~10 ms model (a MatMul
chain; tests/oip_rig.py). In this process, two ordinary clients each send
``--requests`` Open Inference Protocol JSON requests one after another on keep-alive
connections, in three phases that alternate for ``--rounds`` rounds:

- steady: the ordinary clients alone;
- attack: while three clients post ``--attack-mb`` MB JSON bodies (a real tensor
  written out as JSON) as fast as they can, each on a new connection;
- control: while three clients post tiny bodies as fast as they can.

The posting clients run in a process of their own, as hostile clients would be on
other machines: they share the cores, not the ordinary clients' GIL.

Printed: each phase's p50/p99 (median over rounds), attack and control p99 as ratios of
the steady p99 in the same run (goal: attack <= 2x), failed ordinary requests (goal 0),
what the posters were answered, and the server's RSS (idle, peak while attacked, peak
in control). Loopback only; every phase is bounded by ``--requests`` and
``--phase-timeout``.

Two parts then attack a real agent (``slimfleet-agent`` in a process of its own, on a
mosquitto this script starts; the tests' rig publishes and signs):

- mqtt: one 100 MB message on the agent's desired-state topic, over MQTT 3.1.1 and 5.
  Printed: the agent's RSS idle, peak within ``--settle`` s, and the growth (goal
  <= 10 MB); whether it dropped the message and followed the next desired state.
- swap: a good new model swapped in under ``--flood`` malformed requests a second
  through its whole watch window, beside one ordinary client. Printed: whether it was
  rolled back (goal: no) and how many ordinary requests failed (goal 0).

Run::

    python bench/attack_bench.py                 # all three parts, a few minutes
    python bench/attack_bench.py --part mqtt     # one part: http, mqtt or swap
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]

WIDTH, ROWS, DEPTH = 256, 1024, 10
PATH = "/v2/models/main/infer"
ORDINARY_CLIENTS = 2
POSTERS = 3


def serve() -> None:
    """The server process: print the port, serve until stdin closes."""
    sys.path[:0] = [str(REPO / "tests")]
    from oip_rig import OrtBackend, matmul_chain  # the tests' backend and model

    from slimfleet.agent.serve import HttpApi
    from slimfleet.agent.wire import ModelRef

    backend = OrtBackend({"main": (ModelRef("matmul", 1), matmul_chain(WIDTH, DEPTH, ROWS))})
    with HttpApi(backend) as api:
        print(api.port, flush=True)
        sys.stdin.read()


def ordinary_body() -> bytes:
    x = np.random.default_rng(0).normal(size=(1, WIDTH)).astype(np.float32)
    doc = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": x.tolist()}]}
    return json.dumps(doc).encode()


def huge_body(megabytes: int) -> bytes:
    """A JSON request of ``megabytes`` MB: one FP32 tensor written out in full."""
    count = megabytes * 1_000_000 // 10
    data = ("0.12345678," * count)[:-1]
    head = f'{{"inputs": [{{"name": "x", "shape": [1, {count}], "datatype": "FP32", "data": ['
    return (head + data + "]}]}").encode()


def ordinary(
    port: int, body: bytes, count: int, until: float, out: list[float], fails: list[str]
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(count):
            if time.monotonic() > until:
                fails.append("phase timeout")
                return
            started = time.perf_counter()
            try:
                conn.request("POST", PATH, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                fails.append(type(exc).__name__)
                conn.close()
                continue
            if response.status != 200:
                fails.append(str(response.status))
            else:
                out.append(time.perf_counter() - started)
    finally:
        conn.close()


def poster(port: int, body: bytes, stop: threading.Event, answers: Counter[str]) -> None:
    """Post ``body`` again and again, each on a new connection; count the answers."""
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(head)
                sock.sendall(body)
                line = sock.makefile("rb").readline()
            answers[line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "no answer"] += 1
        except OSError as exc:
            answers[f"cut ({type(exc).__name__})"] += 1


def posters(port: int, megabytes: int) -> None:
    """The posters' process (apart, as hostile clients would be, so that they cost the
    ordinary clients no GIL): POSTERS threads post until stdin closes, then the answers
    they got are printed as JSON."""
    body = huge_body(megabytes) if megabytes else b"{}"
    stop = threading.Event()
    answers: Counter[str] = Counter()
    threads = [
        threading.Thread(target=poster, args=(port, body, stop, answers)) for _ in range(POSTERS)
    ]
    for t in threads:
        t.start()
    print("posting", flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    print(json.dumps(answers), flush=True)


def rss_peak(proc: psutil.Process, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        out.append(proc.memory_info().rss)
        time.sleep(0.02)


def phase(
    port: int, server: psutil.Process, args: argparse.Namespace, post_mb: int | None
) -> tuple[list[float], list[str], Counter[str], int]:
    """One phase: latencies, failures, posters' answers, peak server RSS. ``post_mb``
    None: no posters; 0: tiny bodies; else bodies of that many MB."""
    body = ordinary_body()
    latencies: list[float] = []
    fails: list[str] = []
    rss: list[int] = [server.memory_info().rss]
    stop = threading.Event()
    watch = threading.Thread(target=rss_peak, args=(server, stop, rss))
    watch.start()
    proc = None
    if post_mb is not None:
        command = [sys.executable, __file__, "--post", str(post_mb), "--port", str(port)]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # type: ignore[union-attr]  # "posting"
        time.sleep(0.3)  # let them get going
    until = time.monotonic() + args.phase_timeout
    clients = [
        threading.Thread(target=ordinary, args=(port, body, args.requests, until, latencies, fails))
        for _ in range(ORDINARY_CLIENTS)
    ]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    answers: Counter[str] = Counter()
    if proc is not None:
        out, _ = proc.communicate(timeout=60)
        answers.update(json.loads(out))
    stop.set()
    watch.join()
    return latencies, fails, answers, max(rss)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=150, help="per ordinary client per phase")
    parser.add_argument("--attack-mb", type=int, default=60)
    parser.add_argument("--phase-timeout", type=float, default=60.0)
    parser.add_argument("--part", choices=["http", "mqtt", "swap", "all"], default="all")
    parser.add_argument("--settle", type=float, default=5.0, help="s to watch RSS after")
    parser.add_argument("--flood", type=float, default=40.0, help="malformed requests/s")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--post", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.post is not None:
        posters(args.port, args.post)
        return
    if args.part in ("http", "all"):
        http_part(args)
    if args.part in ("mqtt", "swap", "all"):
        agent_parts(args)


def http_part(args: argparse.Namespace) -> None:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        server = psutil.Process(proc.pid)
        run(port, server, args)
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)


def run(port: int, server: psutil.Process, args: argparse.Namespace) -> None:
    phase(port, server, argparse.Namespace(requests=20, phase_timeout=30), None)  # warm-up
    idle_rss = server.memory_info().rss
    kinds: dict[str, int | None] = {"steady": None, "attack": args.attack_mb, "control": 0}
    p50: dict[str, list[float]] = {k: [] for k in kinds}
    p99: dict[str, list[float]] = {k: [] for k in kinds}
    peak: dict[str, int] = dict.fromkeys(kinds, 0)
    fails: list[str] = []
    answers: dict[str, Counter[str]] = {k: Counter() for k in kinds}
    started = time.monotonic()
    for _ in range(args.rounds):
        for kind, post_mb in kinds.items():
            latencies, failed, answered, rss = phase(port, server, args, post_mb)
            p50[kind].append(pct(latencies, 50))
            p99[kind].append(pct(latencies, 99))
            peak[kind] = max(peak[kind], rss)
            fails += failed
            answers[kind] += answered
    median: Callable[[list[float]], float] = statistics.median
    steady = median(p99["steady"])
    print(
        f"attack_bench: {ORDINARY_CLIENTS} ordinary clients x {args.requests} JSON requests "
        f"per phase, {args.rounds} rounds, {time.monotonic() - started:.0f} s; model "
        f"{WIDTH}x{WIDTH} MatMul x{DEPTH} on {ROWS} rows; HttpApi default limits"
    )
    for kind in kinds:
        ratio = median(p99[kind]) / steady
        posted = ", ".join(f"{n} {a}" for a, n in sorted(answers[kind].items()))
        extra = {
            "steady": "",
            "attack": f"  {POSTERS} posters of {args.attack_mb} MB JSON: {posted}",
            "control": f"  {POSTERS} posters of tiny bodies: {posted}",
        }[kind]
        print(
            f"{kind:8s} p50 {median(p50[kind]):7.2f} ms  p99 {median(p99[kind]):7.2f} ms  "
            f"p99 {ratio:4.2f}x steady{extra}"
        )
    mb = 1024 * 1024
    print(
        f"server RSS: idle {idle_rss / mb:.0f} MB, peak steady {peak['steady'] / mb:.0f} MB, "
        f"peak attack {peak['attack'] / mb:.0f} MB (+{(peak['attack'] - idle_rss) / mb:.0f} MB), "
        f"peak control {peak['control'] / mb:.0f} MB"
    )
    goal = median(p99["attack"]) <= 2 * steady
    print(f"failed ordinary requests: {len(fails)} {dict(Counter(fails)) if fails else ''}")
    print(f"goal attack p99 <= 2x steady p99: {'met' if goal else 'NOT met'}")


# -- a real agent attacked over MQTT and during a swap ------------------------------------

MB = 1024 * 1024


def agent_parts(args: argparse.Namespace) -> None:
    """Start mosquitto, then run the mqtt and/or swap parts against real agents."""
    sys.path[:0] = [str(REPO / "tests")]
    from brokers import Mosquitto
    from securefleet import load_agent_rig

    rigs = load_agent_rig()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            if args.part in ("mqtt", "all"):
                for protocol in ("3.1.1", "5"):
                    mqtt_part(rigs, broker.url, Path(tmp) / f"mqtt{protocol}", protocol, args)
            if args.part in ("swap", "all"):
                swap_part(rigs, broker.url, Path(tmp) / "swap", args)
        finally:
            broker.stop()


class AgentUnderAttack:
    """A rig (fleet, keys, publisher) and a ``slimfleet-agent`` process serving m@1."""

    def __init__(self, rigs, url: str, tmp: Path, protocol: str = "3.1.1", **extra) -> None:  # type: ignore[no-untyped-def]
        sys.path[:0] = [str(REPO / "tests")]
        import models

        self.models, self.tmp = models, tmp
        self.rig = rigs.Rig(url, f"bench/attack/{tmp.name}", tmp)
        self.watcher = rigs.Watcher(url, self.rig.topics, self.rig.device, f"w-{tmp.name}")
        for version in (1, 2):
            self.rig.publish(models.add_const(float(version)), version)
        config = self.rig.write_agent_yaml(url, protocol, **extra)
        self.proc = rigs.AgentProcess(config, tmp / "agent.log")
        self.ps = psutil.Process(self.proc.proc.pid)
        try:  # a desired state issued before the agent's store exists would be a replay
            self.watcher.wait("status", lambda s: s == "online", 60)
            self.deploy(1)
        except BaseException:
            self.close()
            raise

    def deploy(self, version: int, timeout: float = 60.0) -> None:
        """Deploy m@version; wait until the agent serves it (an AssertionError if not)."""
        self.rig.assign(version)
        seq = self.rig.seq
        self.watcher.wait(
            "state", lambda s: (s["desired"] or {}).get("seq") == seq and s["status"] == "serving",
            timeout,
        )  # fmt: skip

    def close(self) -> None:
        self.proc.terminate()
        self.watcher.close()
        self.rig.close()


def mqtt_part(rigs, url: str, tmp: Path, protocol: str, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    """One 100 MB message on the agent's desired topic; its RSS before and after."""
    agent = AgentUnderAttack(rigs, url, tmp, protocol)
    publisher = rigs.Publisher(url, f"attacker-{tmp.name}")
    try:
        time.sleep(1.0)
        idle = 0
        for _ in range(10):  # its steady size: the highest of ten samples over half a second
            idle = max(idle, agent.ps.memory_info().rss)
            time.sleep(0.05)
        rss: list[int] = []
        stop = threading.Event()
        watch = threading.Thread(target=rss_peak, args=(agent.ps, stop, rss))
        watch.start()
        publisher.put(agent.rig.topics.device(agent.rig.device, "desired"), b"{" * (100 * MB),
                      retain=False)  # fmt: skip
        time.sleep(args.settle)
        stop.set()
        watch.join()
        dropped = agent.watcher.events("message_dropped")
        followed = "followed"
        try:
            agent.deploy(2)
        except AssertionError:
            followed = "NOT followed"
        alive = agent.proc.proc.poll() is None
        growth = (max(rss) - idle) / MB
        print(
            f"mqtt {protocol:5s}: agent RSS idle {idle / MB:.0f} MB, peak {max(rss) / MB:.0f} MB "
            f"(+{growth:.1f} MB) after one 100 MB message; dropped by "
            f"{'the agent (message_dropped)' if dropped else 'the broker (max packet size)'}"
            f"; next desired state {followed}; agent {'alive' if alive else 'DEAD'}; "
            f"goal +<= 10 MB: {'met' if growth <= 10 and alive else 'NOT met'}"
        )
    finally:
        publisher.close()
        agent.close()


def swap_part(rigs, url: str, tmp: Path, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    """A swap under a flood of malformed requests: rolled back? ordinary requests failed?"""
    sys.path[:0] = [str(REPO / "tests")]
    from brokers import free_port

    port, window = free_port(), 5.0
    watch = {"window_s": window, "min_requests": 10, "max_error_rate": 0.05}
    agent = AgentUnderAttack(rigs, url, tmp, http={"host": "127.0.0.1", "port": port}, watch=watch)
    x = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                "data": [0.0, 1.0, 2.0, 3.0]}]}).encode()  # fmt: skip
    bad = [b"{not json", x.replace(b"[1, 4]", b"[2, 4]"), x.replace(b'"x"', b'"z"')]
    stop = threading.Event()
    sent: Counter[str] = Counter()
    fails: list[str] = []

    def hostile() -> None:
        i = 0
        while not stop.wait(1 / args.flood):
            sent[str(call(port, bad[i % len(bad)]))] += 1
            i += 1

    def ordinary() -> None:
        while not stop.wait(0.02):
            status = call(port, x)
            sent["ordinary"] += 1
            if status != 200:
                fails.append(str(status))

    threads = [threading.Thread(target=hostile), threading.Thread(target=ordinary)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        agent.deploy(2)
        time.sleep(window + 2.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        fallbacks = agent.watcher.events("fallback")
        print(
            f"swap: m@1 -> m@2 under {args.flood:.0f} malformed requests/s through a {window:.0f}"
            f" s watch window: {'ROLLED BACK' if fallbacks else 'not rolled back'}; answers "
            f"{dict(sent)}; failed ordinary requests: {len(fails)}; goal no rollback and 0 "
            f"failed: {'met' if not fallbacks and not fails else 'NOT met'}"
        )
    finally:
        stop.set()
        agent.close()


def call(port: int, body: bytes) -> int | str:
    """POST ``body`` to the main slot on a new connection; the status or the error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", PATH, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


if __name__ == "__main__":
    main()
