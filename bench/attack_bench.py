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
``--phase-timeout``. Run::

    python bench/attack_bench.py             # about a minute
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
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


if __name__ == "__main__":
    main()
