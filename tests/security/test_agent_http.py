"""Attacks on a real agent's HTTP API while it follows its desired state on a real mosquitto
(issue 8 items 2 and 3): a 60 MB JSON body, a flood of client errors during a swap's watch
window, and a bounded fuzz of its OIP endpoints. The HTTP server alone, over a test
backend, is tested in tests/agent/test_http_limits.py; here the backend is the agent's own.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import models
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oip_rig import call
from securefleet import X, at, served

from slimfleet.agent.watch import Baseline, WatchPolicy, regression

INFER = "/v2/models/main/infer"
GOOD = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
).encode()


def post_huge_json(port: int, megabytes: int) -> bytes:
    """POST a JSON body of ``megabytes`` MB (as fast as the server takes it); the status
    line the agent answered with, or b"" if it closed without one."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        f"Content-Length: {megabytes * 1_000_000}\r\n\r\n"
    )
    block = b'{"inputs": [{"data": [' + b"1.0, " * 200_000
    try:
        sock.sendall(head.encode())
        for _ in range(megabytes):
            sock.sendall(block[:1_000_000])
    except OSError:  # refused before the body was read: the server closed its end
        pass
    try:
        return sock.makefile("rb").readline()
    except OSError:
        return b""
    finally:
        sock.close()


def test_a_60_mb_json_body_is_refused_and_the_agent_keeps_serving(agent):
    port = agent.http.port
    rss = psutil.Process().memory_info().rss
    line = post_huge_json(port, 60)
    assert line.split()[1:2] in ([b"413"], [b"503"]), line
    reply = call(port, "POST", INFER, GOOD, {"Content-Type": "application/json"})
    assert reply.status == 200, reply
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 30_000_000, f"the agent's process grew by {grown} bytes"  # 60 MB never held
    assert served(agent) == 1.0


def test_client_errors_during_a_swap_never_roll_it_back(mosquitto, rig, watcher):
    """40 malformed requests a second through the watch window of a good new model: the
    swap stands (only the model's own failures count), and no ordinary request fails."""
    rig.publish(models.add_const(1.0), 1)
    rig.publish(models.add_const(2.0), 2)
    window = 3.0
    agent = rig.agent(
        mosquitto.url, watch={"window_s": window, "min_requests": 5, "max_error_rate": 0.05}
    )
    agent.start()
    stop, failures, answered = threading.Event(), [], []
    bad = [
        b"{not json",
        json.dumps({"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32"}]}).encode(),
        GOOD.replace(b"[1, 4]", b"[2, 4]"),
        GOOD.replace(b"FP32", b"INT64"),
    ]

    def hostile() -> None:
        i = 0
        while not stop.is_set():
            reply = call(agent.http.port, "POST", INFER, bad[i % len(bad)])
            answered.append(reply.status)
            i += 1
            time.sleep(1 / 40)

    def ordinary() -> None:
        while not stop.is_set():
            reply = call(agent.http.port, "POST", INFER, GOOD)
            if reply.status != 200:
                failures.append(reply)
            time.sleep(0.02)

    threads = [threading.Thread(target=hostile), threading.Thread(target=ordinary)]
    try:
        rig.assign(1)
        watcher.wait("state", at(1, "serving"))
        for thread in threads:
            thread.start()
        rig.assign(2)
        watcher.event("swap_ok", deployment={"main": [{"name": "m", "version": 2}]})
        time.sleep(window + 1.5)  # the whole watch window under the flood
        stop.set()
        for thread in threads:
            thread.join(10)
        assert watcher.events("fallback") == []
        assert served(agent) == 2.0
        state = watcher.wait("state", at(2, "serving"))
        assert state["deployment"] == {"main": [{"name": "m", "version": 2}]}
        assert len(answered) > 3 * 40 * 0.5 and set(answered) <= {400, 404, 415, 422}
        assert failures == []
    finally:
        stop.set()
        agent.stop()


@pytest.mark.parametrize(
    ("before_ms", "after_ms", "rolled_back"),
    [(0.35, 0.53, False), (0.35, 2.0, False), (0.35, 2.5, True), (10.0, 20.0, True)],
)
def test_a_latency_rise_within_scheduling_noise_is_no_regression(before_ms, after_ms, rolled_back):
    """A flood of requests (valid or not) doubles a sub-millisecond model's p95; that must
    not veto the swap, while a real slowdown still does."""
    policy = WatchPolicy(window_s=5, min_requests=5, max_p95_ratio=1.5)
    base = Baseline(0.0, before_ms / 1000)
    reason = regression(policy, np.full(50, after_ms / 1000), base)
    assert (reason is not None) == rolled_back, reason


# -- a bounded fuzz of the agent's OIP endpoints ---------------------------------------------

PATHS = [
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/main",
    "/v2/models/main/ready",
    INFER,
    "/v2/models/main/versions/1/infer",
    "/v2/models/main/versions/9/infer",
    "/v2/models/other/infer",
    "/metrics",
    "/healthz",
]
_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)
_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]),
        "shape": st.lists(st.integers(-1, 5), max_size=3) | _value,
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "nope"]),
        "data": st.lists(st.floats(width=32), max_size=20) | _value,
    }
)
_body = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(_tensor, max_size=2)}).map(json.dumps),
    _value.map(json.dumps),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


@pytest.fixture(scope="module")
def fuzzed(module_agent):
    _, watcher, agent, _ = module_agent
    return agent, watcher


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(PATHS) | st.text(max_size=20).map(lambda t: "/v2/models/" + t),
    body=_body,
)
def test_fuzzed_requests_to_the_agent_get_a_4xx_and_it_keeps_serving(fuzzed, method, path, body):
    agent, watcher = fuzzed
    target = path.encode("utf-8", "replace").decode("ascii", "replace")
    target = "".join(c if 32 < ord(c) < 127 and c != "?" else "_" for c in target)
    reply = call(agent.http.port, method, target, body.encode("utf-8", "surrogatepass"))
    assert reply.status in (200, 404, 405) or 400 <= reply.status < 500, (reply, path, body)
    assert served(agent) == 1.0
    assert watcher.events("fallback") == []
