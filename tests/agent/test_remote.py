"""The remote tier against a real HTTP server on loopback that answers, stalls, drips,
answers garbage, errors and sends oversized bodies."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from slimfleet.agent.chain import Chain, TierTimeout
from slimfleet.agent.confidence import max_prob
from slimfleet.agent.deployment import Gate, RemoteTier
from slimfleet.agent.errors import ConfigError
from slimfleet.agent.inference import InferenceError
from slimfleet.agent.remote import (
    FAILURES_TO_OPEN,
    OPEN_SECONDS,
    RemoteClient,
    decode_response,
    encode_request,
)
from slimfleet.agent.wire import EVENT_TIER_FAILING, EVENT_TIER_RECOVERED

CAP = 4096  # the response cap the tests give the client (the default is 16 MiB)


class Handler(BaseHTTPRequestHandler):
    """/v2/models/<mode>/infer: ok doubles every input (as ``<name>_x2``); stall sleeps
    past any test timeout; drip sends a valid body a byte at a time; garbage, error,
    huge (by Content-Length), huge_chunked (no length) and toggle (fails while the
    server's ``failing`` flag is set) misbehave as named."""

    server: Server

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass

    def _send(self, status: int, body: bytes, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        # the client giving up first is what the timeout and size tests expect
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer()

    def _answer(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, request))
        mode = self.path.split("/")[3]
        if mode == "toggle":
            mode = "error" if self.server.failing else "ok"
        if mode == "ok":
            time.sleep(self.server.delay)
            outputs = [
                {**i, "name": i["name"] + "_x2", "data": [2 * v for v in i["data"]]}
                for i in request["inputs"]
            ]
            self._send(200, json.dumps({"model_name": "m", "outputs": outputs}).encode())
        elif mode == "stall":
            time.sleep(2.0)
            self._send(200, b"{}")
        elif mode == "drip":
            body = json.dumps(
                {"outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        elif mode == "garbage":
            self._send(200, b"<html>not json at all</html>")
        elif mode == "error":
            self._send(500, json.dumps({"error": "model exploded"}).encode())
        elif mode == "huge":
            self._send(200, b"[" + b"1," * CAP + b"1]")
        elif mode == "huge_chunked":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(8):
                self.wfile.write(b" " * CAP)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict]] = []
        self.failing = False
        self.delay = 0.0  # seconds before an "ok" answer

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v2/models/{mode}/infer"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def client(server: Server, mode: str, timeout: float = 0.5, **kwargs) -> RemoteClient:  # type: ignore[no-untyped-def]
    return RemoteClient(RemoteTier(server.url(mode), timeout), max_response_bytes=CAP, **kwargs)


FEEDS = {"x": np.array([[1.5, -2.0, 3.25]], np.float32), "n": np.array([7], np.int64)}


def test_it_sends_oip_v2_json_and_reads_the_answer(server: Server) -> None:
    outputs = client(server, "ok").run(FEEDS)
    assert set(outputs) == {"x_x2", "n_x2"}
    np.testing.assert_array_equal(outputs["x_x2"], FEEDS["x"] * 2)
    assert outputs["x_x2"].dtype == np.float32 and outputs["n_x2"].dtype == np.int64
    path, request = server.requests[0]
    assert path == "/v2/models/ok/infer"
    assert request["inputs"][0] == {
        "name": "x",
        "shape": [1, 3],
        "datatype": "FP32",
        "data": [1.5, -2.0, 3.25],
    }
    assert request["inputs"][1]["datatype"] == "INT64"


def test_a_stalled_server_times_out_in_time(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(TierTimeout, match="no answer within 0.3 s"):
        client(server, "stall", timeout=0.3).run(FEEDS)
    assert time.monotonic() - started < 1.5


def test_the_timeout_bounds_the_whole_exchange_not_each_read(server: Server) -> None:
    started = time.monotonic()  # every byte comes within 0.05 s, the body takes seconds
    with pytest.raises(TierTimeout):
        client(server, "drip", timeout=0.4).run(FEEDS)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("garbage", "remote: not an OIP v2 answer"),
        ("error", "remote: HTTP 500: model exploded"),
        ("huge", f"over the {CAP}"),
        ("huge_chunked", f"over the {CAP} byte cap"),
    ],
)
def test_bad_answers_fail_with_one_line(server: Server, mode: str, message: str) -> None:
    with pytest.raises(InferenceError, match=message) as caught:
        client(server, mode).run(FEEDS)
    assert not isinstance(caught.value, TierTimeout)
    assert "\n" not in str(caught.value)


def test_nobody_listening_is_a_failure() -> None:
    srv = Server()
    url = srv.url("ok")
    srv.server_close()
    with pytest.raises(InferenceError, match="remote: ConnectionRefusedError"):
        RemoteClient(RemoteTier(url, 0.5)).run(FEEDS)


def test_only_http_urls() -> None:
    for url in (
        "ftp://host/v2/models/m/infer",
        "file:///etc/passwd",
        "http:///nohost",
        "http://[::1",
    ):
        with pytest.raises(ConfigError, match="expected an http"):
            RemoteClient(RemoteTier(url, 1.0))


def test_the_breaker_opens_half_opens_and_recovers(server: Server) -> None:
    now = [1000.0]
    events: list[tuple[str, str]] = []
    remote = client(server, "toggle", clock=lambda: now[0], on_event=lambda *e: events.append(e))
    server.failing = True
    for _ in range(FAILURES_TO_OPEN):
        with pytest.raises(InferenceError, match="HTTP 500"):
            remote.run(FEEDS)
    assert remote.open and [e for e, _ in events] == [EVENT_TIER_FAILING]
    assert "circuit open for 30 s" in events[0][1]
    asked = len(server.requests)
    with pytest.raises(InferenceError, match=r"circuit open .*\(next try in 30 s\)"):
        remote.run(FEEDS)
    assert len(server.requests) == asked  # an open breaker does not ask the server
    now[0] += OPEN_SECONDS  # half-open: one trial, which fails: open again, one event
    with pytest.raises(InferenceError, match="HTTP 500"):
        remote.run(FEEDS)
    assert len(server.requests) == asked + 1 and remote.open
    assert [e for e, _ in events] == [EVENT_TIER_FAILING, EVENT_TIER_FAILING]
    with pytest.raises(InferenceError, match="circuit open"):
        remote.run(FEEDS)
    server.failing = False
    now[0] += OPEN_SECONDS  # the next trial succeeds: closed, recovered
    assert "x_x2" in remote.run(FEEDS)
    assert not remote.open and events[-1][0] == EVENT_TIER_RECOVERED
    remote.run(FEEDS)
    assert len(events) == 3  # no event while healthy


def test_half_open_lets_exactly_one_trial_through(server: Server) -> None:
    now = [0.0]
    remote = client(server, "toggle", timeout=2.0, clock=lambda: now[0])
    server.failing = True
    for _ in range(FAILURES_TO_OPEN):
        with pytest.raises(InferenceError):
            remote.run(FEEDS)
    server.failing, server.delay = False, 0.3  # the trial takes a while
    now[0] += OPEN_SECONDS
    asked = len(server.requests)
    results: list[str] = []

    def request() -> None:
        try:
            remote.run(FEEDS)
            results.append("answered")
        except InferenceError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("answered") == 1, results
    assert all("a trial is in flight" in r for r in results if r != "answered")
    assert len(server.requests) == asked + 1 and not remote.open


def test_a_success_resets_the_count_of_consecutive_failures(server: Server) -> None:
    remote = client(server, "toggle")
    for _ in range(3):
        server.failing = True
        for _ in range(FAILURES_TO_OPEN - 1):
            with pytest.raises(InferenceError):
                remote.run(FEEDS)
        server.failing = False
        remote.run(FEEDS)
    assert not remote.open


def test_a_raising_event_callback_does_not_fail_requests(server: Server) -> None:
    def explode(event: str, reason: str) -> None:
        raise RuntimeError("callback bug")

    remote = client(server, "error", on_event=explode)
    for _ in range(FAILURES_TO_OPEN):
        with pytest.raises(InferenceError, match="HTTP 500"):
            remote.run(FEEDS)
    assert remote.open


def test_the_chain_escalates_to_the_remote_and_names_its_timeout(server: Server) -> None:
    class Unsure:
        label = "int8@1"

        def run(self, feeds):  # type: ignore[no-untyped-def]
            return {"p": np.full((1, 3), 1 / 3, np.float32)}

    answer = Chain([Unsure()], Gate("max_prob", 0.9), max_prob, client(server, "ok")).run(FEEDS)
    assert (answer.tier_index, answer.label) == (1, "remote")
    assert answer.escalations == [("int8@1", "low confidence 0.3333 < 0.9")]
    stalled = Chain([Unsure()], Gate("max_prob", 0.9), max_prob, client(server, "stall", 0.2))
    fallback = stalled.run(FEEDS)
    assert fallback.label == "int8@1" and fallback.escalations == [("remote", "timeout")]


def test_codec_round_trip_and_validation() -> None:
    body = json.loads(encode_request({"b": np.array([True, False])}))
    assert body["inputs"][0]["datatype"] == "BOOL"
    with pytest.raises(InferenceError, match="cannot send input 's'"):
        encode_request({"s": np.array(["a"], dtype=object)})
    good = {"outputs": [{"name": "y", "shape": [2, 2], "datatype": "FP16", "data": [1, 2, 3, 4]}]}
    assert decode_response(json.dumps(good).encode())["y"].shape == (2, 2)
    for broken, message in [
        ({"outputs": []}, "no 'outputs'"),
        ({"outputs": [{"name": "y", "shape": [3], "datatype": "FP32", "data": [1]}]}, "1 values"),
        ({"outputs": [{"name": "y", "shape": [-1], "datatype": "FP32", "data": []}]}, "shape"),
        ({"outputs": [{"name": "y", "shape": [1], "datatype": "STR", "data": [1]}]}, "datatype"),
    ]:
        with pytest.raises(ValueError, match=message):
            decode_response(json.dumps(broken).encode())


def test_an_unexpected_error_is_a_failure_and_never_wedges_the_breaker() -> None:
    now = [0.0]
    remote = RemoteClient(
        RemoteTier("http://127.0.0.1:9/v2/models/a b/infer", 0.5), clock=lambda: now[0]
    )
    for _ in range(FAILURES_TO_OPEN):  # http.client refuses the path: InvalidURL
        with pytest.raises(InferenceError, match="remote: InvalidURL"):
            remote.run(FEEDS)
    assert remote.open
    for _ in range(2):  # each trial fails the same way and the next one is still let through
        now[0] += OPEN_SECONDS
        with pytest.raises(InferenceError, match="InvalidURL"):
            remote.run(FEEDS)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no trust store knows, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_refuses_a_certificate_nobody_vouches_for(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    srv = Server()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = srv.url("ok").replace("http://", "https://")
        with pytest.raises(InferenceError, match="SSLCertVerificationError") as caught:
            RemoteClient(RemoteTier(url, 2.0)).run(FEEDS)
        assert "\n" not in str(caught.value)
        assert srv.requests == []  # nothing was sent to it
    finally:
        srv.shutdown()
        srv.server_close()
