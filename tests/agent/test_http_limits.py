"""The HTTP API's bounds: body sizes, the request deadline, the connection cap, and a
bounded fuzz of every endpoint (the server answers, with a 4xx, and stays up)."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oip_rig import OrtBackend, binary_body, call, tensor

from slimfleet.agent.httplimits import HttpLimits, MiB
from slimfleet.agent.httpserver import EVICT_AFTER_S, UNREAD_ANSWER_S
from slimfleet.agent.serve import HttpApi

LIMITS = HttpLimits(
    max_connections=4,
    request_timeout_s=1.0,
    idle_timeout_s=1.0,
    max_json_bytes=2048,
    max_binary_bytes=64 * 1024,
)
INFER = "/v2/models/det/infer"


@pytest.fixture
def api(oip_backend: OrtBackend) -> Iterator[HttpApi]:
    with HttpApi(oip_backend, limits=LIMITS) as api:
        yield api


def _rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.ones((n, 4), dtype=np.float32), np.ones((n, 4), dtype=bool)


def _status_line(sock: socket.socket) -> bytes:
    return sock.makefile("rb").readline()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_json_bytes"):
        HttpLimits(max_json_bytes=10, max_binary_bytes=5)
    with pytest.raises(ValueError, match="max_connections must be > 0"):
        HttpLimits(max_connections=0)


def test_json_is_limited_far_below_binary(api: HttpApi, oip_backend: OrtBackend) -> None:
    x, mask = _rows(100)  # ~2.6 KB as JSON, 1.2 KB as binary
    doc = {"inputs": [tensor("x", x), tensor("mask", mask)]}
    answer = call(api.port, "POST", INFER, json.dumps(doc).encode())
    assert answer.status == 413, answer.body
    assert (
        "JSON body of" in answer.json()["error"] and "limit of 2048 bytes" in answer.json()["error"]
    )
    body, headers = binary_body(
        {"inputs": [tensor("x", x, binary=True), tensor("mask", mask, binary=True)]}, x, mask
    )
    answer = call(api.port, "POST", INFER, body, headers)
    assert answer.status == 200
    np.testing.assert_array_equal(answer.oip()[1]["y"], x + 1)
    # over the binary limit; a JSON header over the JSON limit inside a binary body
    x, mask = _rows(4000)
    body, headers = binary_body(
        {"inputs": [tensor("x", x, binary=True), tensor("mask", mask, binary=True)]}, x, mask
    )
    answer = call(api.port, "POST", INFER, body, headers)
    assert answer.status == 413 and "limit of 65536 bytes" in answer.json()["error"]
    padded = {
        "id": "p" * 3000,
        "inputs": [tensor("x", x[:1], binary=True), tensor("mask", mask[:1])],
    }
    body, headers = binary_body(padded, x[:1])
    answer = call(api.port, "POST", INFER, body, headers)
    assert answer.status == 413 and "JSON header of" in answer.json()["error"]
    assert oip_backend.client_errors == {"det": 3} and oip_backend.requests == {"det": 1}


def test_an_oversized_body_is_refused_before_it_is_read(api: HttpApi) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(
            b"POST "
            + INFER.encode()
            + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
        )
        # a server that waited for the body would answer 408 at the 1 s deadline instead
        assert _status_line(sock).startswith(b"HTTP/1.1 413")


def test_conflicting_content_lengths_are_a_400(api: HttpApi) -> None:
    # the first one won: a body boundary a proxy in front may read differently
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 10\r\n\r\n{}"
        )
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert b"conflicting Content-Length headers" in reply


def test_a_slow_client_is_cut_off_at_the_request_deadline(
    api: HttpApi, oip_backend: OrtBackend
) -> None:
    """One header line every 0.3 s: each arrives well within any idle timeout, yet the
    whole request is cut at request_timeout_s (1 s here) with a 408."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\n")
        try:
            for i in range(20):
                time.sleep(0.3)
                sock.sendall(b"X-Drip-%d: still here\r\n" % i)
        except OSError:
            pass  # the server closed the connection: what we want
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"did not arrive within 1 s" in reply
    assert time.monotonic() - started < 5.0  # 20 lines x 0.3 s = 6 s had it not been cut
    # a body that trickles in is cut the same way
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
        started = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(20):
                time.sleep(0.3)
                sock.sendall(b" ")
        assert time.monotonic() - started < 5.0
    assert oip_backend.client_errors[None] + oip_backend.client_errors["det"] == 2
    assert call(api.port, "GET", "/v2/health/live").status == 200


def test_an_idle_connection_is_closed(api: HttpApi) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed without an answer: there was no request
        assert 0.8 < time.monotonic() - started < 5.0


def _wait_connections(api: HttpApi, count: int) -> None:
    deadline = time.monotonic() + 5
    while api.open_connections != count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.open_connections == count


def test_at_the_cap_a_newcomer_replaces_the_slowest_sender(oip_backend: OrtBackend) -> None:
    # slowloris: 70 connections sending a header line every 5 s held the 64 slots, and an
    # ordinary client got 503 on most tries
    limits = HttpLimits(max_connections=4, request_timeout_s=20, idle_timeout_s=20)
    with HttpApi(oip_backend, limits=limits) as api:
        held = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
            sock.sendall(b"GET /v2 HTTP/1.1\r\n")  # started, never finished
            held.append(sock)
            _wait_connections(api, len(held))
        time.sleep(EVICT_AFTER_S + 0.1)  # a request sent within the second is never cut
        newcomers = [
            http.client.HTTPConnection("127.0.0.1", api.port, timeout=10) for _ in range(3)
        ]
        try:
            for conn in newcomers:  # each keeps its connection: the next one needs a slot
                started = time.monotonic()
                assert call(api.port, "GET", "/v2/health/live", conn=conn).status == 200
                assert time.monotonic() - started < 5.0
            for sock in held[:3]:  # the oldest three gave their slots up
                assert sock.recv(100) == b""
            held[3].settimeout(0.3)
            with pytest.raises(TimeoutError):
                held[3].recv(100)  # the youngest keeps its slot
        finally:
            for sock in held:
                sock.close()
            for conn in newcomers:
                conn.close()
        _wait_connections(api, 0)


def test_connections_over_the_cap_get_a_quick_503_when_all_are_answering(
    oip_backend: OrtBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = HttpLimits(max_connections=4, request_timeout_s=20, idle_timeout_s=20)
    release = threading.Event()
    predict = oip_backend.predict

    def slow_predict(*args, **kwargs):
        release.wait(20)
        return predict(*args, **kwargs)

    monkeypatch.setattr(oip_backend, "predict", slow_predict)
    entered = threading.Semaphore(0)

    def counted_predict(*args, **kwargs):
        entered.release()
        return slow_predict(*args, **kwargs)

    monkeypatch.setattr(oip_backend, "predict", counted_predict)
    x, mask = _rows(1)
    body = json.dumps({"inputs": [tensor("x", x), tensor("mask", mask)]}).encode()
    with HttpApi(oip_backend, limits=limits) as api:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(call, api.port, "POST", INFER, body) for _ in range(4)]
            for _ in range(4):  # all four are being answered: none may be cut
                assert entered.acquire(timeout=10)
            time.sleep(EVICT_AFTER_S + 0.1)  # old enough to be cut, were they evictable
            for _ in range(3):
                started = time.monotonic()
                with socket.create_connection(("127.0.0.1", api.port), timeout=10) as extra:
                    extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                    reply = extra.makefile("rb").read()
                assert reply.startswith(b"HTTP/1.1 503"), reply
                assert b"too many connections" in reply
                assert time.monotonic() - started < 5.0
            release.set()
            assert [a.result(timeout=20).status for a in answers] == [200] * 4
        _wait_connections(api, 0)
        assert call(api.port, "GET", "/v2/health/live").status == 200


def test_bodies_in_flight_share_one_budget(oip_backend: OrtBackend) -> None:
    """A big body that does not fit beside those being read is refused 503 before it is
    read; small requests are not charged, so they still get through."""
    limits = HttpLimits(
        max_json_bytes=16 * 1024, max_binary_bytes=256 * 1024, max_inflight_bytes=310 * 1024
    )
    x, mask = _rows(5000)  # 100 KB of binary tensors, and the answer binary too
    doc = {"inputs": [tensor("x", x, binary=True), tensor("mask", mask, binary=True)]}
    body, headers = binary_body({**doc, "parameters": {"binary_data_output": True}}, x, mask)
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {headers['Inference-Header-Content-Length']}\r\n\r\n"
    ).encode()
    with HttpApi(oip_backend, limits=limits) as api:
        slow = [socket.create_connection(("127.0.0.1", api.port), timeout=10) for _ in range(3)]
        for sock in slow:  # three bodies being read: 3 x 100 KB (and headers) of 310 KB
            sock.sendall(head + body[:1000])
        deadline = time.monotonic() + 5
        server = api._server
        assert server is not None
        while server.budget.used < 3 * len(body) and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = call(api.port, "POST", INFER, body, headers)
        assert answer.status == 503 and "busy" in answer.json()["error"]
        small = {"inputs": [tensor("x", x[:1]), tensor("mask", mask[:1])]}
        assert call(api.port, "POST", INFER, json.dumps(small).encode()).status == 200
        for sock in slow:
            sock.sendall(body[1000:])
            assert _status_line(sock).startswith(b"HTTP/1.1 200")
            sock.close()
        deadline = time.monotonic() + 5  # given back once each answer is written
        while server.budget.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.budget.used == 0
        assert call(api.port, "POST", INFER, body, headers).status == 200
    with pytest.raises(ValueError, match="must hold one JSON body"):
        HttpApi(oip_backend, limits=HttpLimits(max_json_bytes=8 * MiB, max_inflight_bytes=64 * MiB))


def test_chunked_and_unmeasured_bodies_are_refused(api: HttpApi) -> None:
    for header, status in ((b"Transfer-Encoding: chunked\r\n", b"411"), (b"", b"411")):
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
            assert _status_line(sock).startswith(b"HTTP/1.1 " + status)


# -- fuzz ------------------------------------------------------------------------------

PATHS = [
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/det",
    "/v2/models/det/ready",
    "/v2/models/det/infer",
    "/v2/models/det/versions/3/infer",
    "/v2/models/nope/infer",
    "/metrics",
    "/healthz",
]
_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)
)
_json = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)
_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "mask", "z", ""]),
        "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), _json),
        "datatype": st.sampled_from(["FP32", "BOOL", "INT64", "BYTES", "FP16", "nope"]),
    },
    optional={
        "data": _json,
        "parameters": st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.integers(-5, 64)}), _json
        ),
    },
)
_request = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(_tensor, max_size=3), _json)},
    optional={"outputs": _json, "parameters": _json, "id": _json},
)


@st.composite
def _http_request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"BREW"]))
    path = draw(st.sampled_from(PATHS) | st.text(max_size=30).map(lambda t: "/v2/" + t))
    doc = json.dumps(draw(_request | _json)).encode()
    body = draw(st.sampled_from([doc, doc + draw(st.binary(max_size=40))]) | st.binary(max_size=80))
    headers = [b"Host: fuzz", b"Content-Length: %d" % len(body)]
    if draw(st.booleans()):
        length = draw(st.integers(-3, len(body) + 3).map(str) | st.text(max_size=4))
        headers.append(b"Inference-Header-Content-Length: " + length.encode("utf-8", "replace"))
    if draw(st.booleans()):
        headers.append(
            b"Content-Type: "
            + draw(st.sampled_from([b"application/json", b"application/x-npy", b"text/plain", b""]))
        )
    target = (
        path.encode("utf-8", "replace")
        .replace(b" ", b"%20")
        .replace(b"\r", b"")
        .replace(b"\n", b"")
    )
    return method + b" " + target + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=_http_request())
def test_fuzzed_requests_get_an_answer_below_500_and_the_server_stays_up(
    oip_api: HttpApi, oip_backend: OrtBackend, raw: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", oip_api.port), timeout=10) as sock:
        sock.sendall(raw)
        line = _status_line(sock)
    assert line.startswith(b"HTTP/1.1 "), (line, raw)
    status = int(line.split()[1])
    assert status == 200 or 400 <= status < 500, (line, raw)
    assert oip_backend.model_errors == {}
    assert call(oip_api.port, "GET", "/v2/health/live").status == 200


def test_a_json_answer_is_charged_to_the_budget_and_one_too_big_is_refused(
    oip_backend: OrtBackend,
) -> None:
    """A 16 MiB binary request asking for its answer in JSON once took 1.5 GB (a Python
    float and its text per value), uncounted; four at once took 5 GB."""
    limits = HttpLimits(
        max_json_bytes=16 * 1024, max_binary_bytes=256 * 1024, max_inflight_bytes=512 * 1024
    )
    x, mask = _rows(5000)  # 20,000 output values: 1.6 MB to build as JSON
    doc = {"inputs": [tensor("x", x, binary=True), tensor("mask", mask, binary=True)]}
    body, headers = binary_body(doc, x, mask)
    with HttpApi(oip_backend, limits=limits) as api:
        answer = call(api.port, "POST", INFER, body, headers)
        assert answer.status == 400 and "binary_data_output" in answer.json()["error"]
        body, headers = binary_body({**doc, "parameters": {"binary_data_output": True}}, x, mask)
        answer = call(api.port, "POST", INFER, body, headers)
        assert answer.status == 200
        np.testing.assert_array_equal(answer.oip()[1]["y"], x + 1)
        x, mask = _rows(1000)  # 320 KB as JSON: fits the budget, charged, then given back
        body, headers = binary_body(
            {"inputs": [tensor("x", x, binary=True), tensor("mask", mask, binary=True)]}, x, mask
        )
        assert call(api.port, "POST", INFER, body, headers).status == 200
        assert api._server is not None and api._server.budget.used == 0


def test_a_client_that_never_reads_its_answer_loses_its_slot(oip_backend: OrtBackend) -> None:
    """Whole requests whose answers are never read held every slot (the writes block,
    and the attacker reconnects): 0 of 145 health checks got through. An answer unread
    for UNREAD_ANSWER_S may be cut for a newcomer at the cap."""
    limits = HttpLimits(
        max_connections=2,
        request_timeout_s=30,
        idle_timeout_s=30,
        max_binary_bytes=32 * MiB,
        max_inflight_bytes=128 * MiB,
    )
    x, mask = _rows(400_000)  # 6.4 MB of answer: more than the socket buffers hold
    doc = {
        "inputs": [tensor("x", x, binary=True), tensor("mask", mask, binary=True)],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_body(doc, x, mask)
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {headers['Inference-Header-Content-Length']}\r\n\r\n"
    ).encode()
    with HttpApi(oip_backend, limits=limits) as api:
        readers = []
        for _ in range(2):  # send whole requests, never read the answers
            sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(head + body)
            readers.append(sock)
        time.sleep(UNREAD_ANSWER_S + 1.0)
        assert call(api.port, "GET", "/v2/health/live").status == 200
        for sock in readers:
            sock.close()
