"""The local HTTP API over real sockets and real sessions."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.serve import HttpApi
from slimfleet.agent.sessions import Serving, WatchPolicy
from slimfleet.agent.wire import ModelRef, SmokeTest

X = np.full((1, 4), 0.5, dtype=np.float32)


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json"
        return json.loads(self.body)


def request(
    api: HttpApi,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Answer:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return Answer(conn.getresponse())
    finally:
        if own:
            conn.close()


def post_json(api: HttpApi, doc: Any, conn: http.client.HTTPConnection | None = None) -> Answer:
    body = json.dumps(doc).encode()
    return request(api, "POST", "/v1/predict", body, {"Content-Type": "application/json"}, conn)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def serving() -> Iterator[Serving]:
    with Serving(watch=WatchPolicy(window_s=0)) as serving:
        yield serving


@pytest.fixture
def api(serving: Serving) -> Iterator[HttpApi]:
    with HttpApi(serving, port=0, max_body_bytes=1 << 20) as api:
        yield api


def test_health_before_and_after_a_model(api: HttpApi, serving: Serving, model_files) -> None:
    answer = request(api, "GET", "/healthz")
    assert (answer.status, answer.json()) == (503, {"status": "no model"})
    serving.start(ModelRef("m", 1), model_files.add(1.0))
    answer = request(api, "GET", "/healthz")
    assert answer.status == 200
    assert answer.json() == {"status": "ok", "model": {"name": "m", "version": 1}}


def test_predict_with_json(api: HttpApi, serving: Serving, model_files) -> None:
    serving.start(ModelRef("m", 1), model_files.add(1.0))
    answer = post_json(api, {"inputs": {"x": X.tolist()}})
    assert answer.status == 200
    doc = answer.json()
    assert doc["model"] == {"name": "m", "version": 1}
    np.testing.assert_allclose(doc["outputs"]["y"], X + 1)


def test_predict_with_npy_and_npz(api: HttpApi, serving: Serving, model_files) -> None:
    serving.start(ModelRef("m", 7), model_files.slow(1.0, rows=2, width=8, depth=1))
    answer = request(api, "POST", "/v1/predict", npy(X), {"Content-Type": "application/x-npy"})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/x-npy"
    assert answer.headers["X-Slimfleet-Model"] == "m@7"
    np.testing.assert_allclose(np.load(io.BytesIO(answer.body)), X + 1)

    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npz"}
    answer = request(api, "POST", "/v1/predict", npy(X.astype(np.float64)), headers)
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/x-npz"
    with np.load(io.BytesIO(answer.body)) as outputs:
        assert sorted(outputs.files) == ["work", "y"]
        np.testing.assert_allclose(outputs["y"], X + 1)
        assert outputs["work"].shape == (2, 8)


def test_metrics_are_prometheus_text(api: HttpApi, serving: Serving, model_files) -> None:
    serving.start(ModelRef("m", 1), model_files.add(1.0))
    for _ in range(3):
        assert post_json(api, {"inputs": {"x": X.tolist()}}).status == 200
    assert post_json(api, {"inputs": {"nope": X.tolist()}}).status == 400
    answer = request(api, "GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
    assert families["slimfleet_agent_requests"].samples[0].value == 4
    assert families["slimfleet_agent_request_errors"].samples[0].value == 1
    assert families["slimfleet_agent_model_info"].samples[0].labels == {"name": "m", "version": "1"}


BAD_REQUESTS = [
    ("not json", b"{inputs", "application/json", 400, "body is not valid JSON"),
    ("no inputs", b'{"x": [1]}', "application/json", 400, 'body must be {"inputs"'),
    ("inputs a list", b'{"inputs": [1]}', "application/json", 400, 'body must be {"inputs"'),
    (
        "wrong name",
        b'{"inputs": {"z": [[1, 2, 3, 4]]}}',
        "application/json",
        400,
        "expects inputs 'x'",
    ),
    (
        "wrong shape",
        b'{"inputs": {"x": [1, 2, 3, 4]}}',
        "application/json",
        400,
        "expected shape [1, 4]",
    ),
    (
        "ragged",
        b'{"inputs": {"x": [[1, 2], [3]]}}',
        "application/json",
        400,
        "cannot make a float32",
    ),
    (
        "strings",
        b'{"inputs": {"x": [["a", "b", "c", "d"]]}}',
        "application/json",
        400,
        "cannot make",
    ),
    ("not npy", b"\x93NUMPY garbage", "application/x-npy", 400, "body is not a .npy array"),
    ("pickled npy", None, "application/x-npy", 400, "body is not a .npy array"),
    ("text", b"x=1", "text/plain", 415, "Content-Type must be application/json"),
]


@pytest.mark.parametrize(
    ("body", "kind", "status", "message"),
    [b[1:] for b in BAD_REQUESTS],
    ids=[b[0] for b in BAD_REQUESTS],
)
def test_bad_bodies_get_a_clear_4xx(
    api: HttpApi,
    serving: Serving,
    model_files,
    body: bytes | None,
    kind: str,
    status: int,
    message: str,
) -> None:
    serving.start(ModelRef("m", 1), model_files.add(1.0))
    if body is None:  # an object array can only be loaded with pickle, which is refused
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        body = buffer.getvalue()
    answer = request(api, "POST", "/v1/predict", body, {"Content-Type": kind})
    assert answer.status == status
    assert message in answer.json()["error"]
    assert request(api, "GET", "/healthz").status == 200  # the server lives on


def test_protocol_errors(api: HttpApi, serving: Serving, model_files) -> None:
    serving.start(ModelRef("m", 1), model_files.two_inputs())
    answer = request(api, "POST", "/v1/predict", npy(X), {"Content-Type": "application/x-npy"})
    assert answer.status == 400 and "single-input model" in answer.json()["error"]
    answer = request(api, "GET", "/v1/predict")
    assert answer.status == 405
    answer = request(api, "GET", "/nowhere")
    assert answer.status == 404 and "no such endpoint: /nowhere" in answer.json()["error"]
    # No Content-Length, and one far over the limit: answered before any body is read.
    for header, status in ((b"", b"411"), (b"Content-Length: 1000000000\r\n", b"413")):
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + header
                + b"\r\n"
            )
            reply = sock.makefile("rb").readline()
        assert reply.startswith(b"HTTP/1.1 " + status), reply
    answer = post_json(api, {"inputs": {"a": [[1, 2, 3, 4]], "b": [[1, 1, 1, 1]]}})
    assert answer.json()["outputs"]["y"] == [[2, 3, 4, 5]]


def test_no_model_and_model_failures(api: HttpApi, serving: Serving, model_files) -> None:
    answer = post_json(api, {"inputs": {"x": X.tolist()}})
    assert answer.status == 503 and answer.json()["error"] == "no model is loaded"
    answer = request(api, "POST", "/v1/predict", npy(X), {"Content-Type": "application/x-npy"})
    assert answer.status == 503
    serving.start(ModelRef("m", 1), model_files.gather(1.0))
    answer = post_json(api, {"inputs": {"x": [[5, 5, 5, 5]]}})
    assert answer.status == 500 and "inference failed" in answer.json()["error"]
    assert post_json(api, {"inputs": {"x": [[0, 1, 0, 1]]}}).status == 200


def test_concurrent_requests_during_swaps(api: HttpApi, serving: Serving, model_files) -> None:
    files = [model_files.add(float(v)) for v in range(1, 7)]
    serving.start(ModelRef("m", 1), files[0])
    results: list[tuple[int, float, int]] = []  # status, value computed, version named
    stop = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)  # keep-alive
        try:
            while not stop.is_set() or len(results) < 200:
                answer = post_json(api, {"inputs": {"x": X.tolist()}}, conn)
                doc = answer.json()
                if answer.status != 200:
                    results.append((answer.status, -1, -1))
                    continue
                value = round(doc["outputs"]["y"][0][0] - 0.5, 3)
                results.append((answer.status, value, doc["model"]["version"]))
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for version, path in enumerate(files[1:], start=2):
        smoke = SmokeTest(inputs={"x": X}, outputs={"y": X + version})
        serving.activate(ModelRef("m", version), path, smoke)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(results) >= 200
    assert {status for status, _, _ in results} == {200}
    assert {value for _, value, _ in results} <= {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}
    assert all(value == version for _, value, version in results), "the answer names its model"
    assert post_json(api, {"inputs": {"x": X.tolist()}}).json()["model"]["version"] == 6


def test_stop_closes_the_port_and_a_taken_port_is_an_error(serving: Serving) -> None:
    api = HttpApi(serving)
    api.start()
    port = api.port
    with pytest.raises(SlimfleetError, match=f"cannot listen on 127.0.0.1:{port}"):
        HttpApi(serving, port=port).start()
    kept_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert request(api, "GET", "/healthz", conn=kept_alive).status == 503
    api.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    with pytest.raises((OSError, http.client.HTTPException)):  # open connections are closed too
        request(api, "GET", "/healthz", conn=kept_alive)


def _wait_until_no_connections(api: HttpApi) -> None:
    server = api._server
    assert server is not None
    deadline = time.monotonic() + 20
    while server._connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server._connections, "the server still holds the dropped connection"


def test_a_client_that_drops_mid_request_costs_no_traceback(
    api: HttpApi, serving: Serving, model_files, caplog, capfd
) -> None:
    serving.start(ModelRef("m", 1), model_files.add(1.0))
    caplog.set_level(logging.DEBUG, logger="slimfleet.agent.serve")
    body = json.dumps({"inputs": {"x": X.tolist()}}).encode()
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        # one whole request first, so the server is reading this connection
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        # close with a reset, as a killed client or a dropped link does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        _wait_until_no_connections(api)
    assert "Traceback" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert request(api, "GET", "/healthz").status == 200
