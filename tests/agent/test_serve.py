"""The HTTP API (Open Inference Protocol v2) over real sockets and real onnxruntime sessions."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import struct
import threading
import time
from typing import Any

import numpy as np
import pytest
from oip_rig import OrtBackend, binary_body, call, lookup, masked_add, tensor, text_in, text_out

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.serve import HttpApi
from slimfleet.agent.wire import ModelRef

X = np.arange(8, dtype=np.float32).reshape(2, 4)
MASK = np.array([[True, False, True, False], [True, True, True, True]])
Y = np.where(MASK, X + 1, X)
COUNT = np.array([2, 4], dtype=np.int64)
IDS = np.array([[2, 0, 1]], dtype=np.int64)
VEC = np.array([[4, 0, 2]], dtype=np.float16)


def infer_json(api: HttpApi, slot: str, doc: Any, path: str | None = None) -> Any:
    return call(api.port, "POST", path or f"/v2/models/{slot}/infer", json.dumps(doc).encode())


def det_doc(**extra: Any) -> dict[str, Any]:
    return {"inputs": [tensor("x", X), tensor("mask", MASK)], **extra}


def test_server_metadata_and_health(oip_api: HttpApi, oip_backend: OrtBackend) -> None:
    for path in ("/v2", "/v2/"):
        doc = call(oip_api.port, "GET", path).json()
        assert doc["name"] == "slimfleet-agent"
        assert doc["extensions"] == ["binary_tensor_data"]
        assert isinstance(doc["version"], str) and doc["version"]
    assert call(oip_api.port, "GET", "/v2/health/live").status == 200
    assert call(oip_api.port, "GET", "/v2/health/ready").status == 200
    healthz = call(oip_api.port, "GET", "/healthz").json()
    assert healthz["models"] == {
        "det": {"name": "det", "version": 3},
        "rec": {"name": "rec", "version": 5},
    }
    assert healthz["model"] is None  # no slot named main


def test_a_slot_without_a_model_is_not_ready_and_that_is_no_client_error() -> None:
    backend = OrtBackend({"main": (ModelRef("m", 2), masked_add()), "later": None})
    with HttpApi(backend) as api:
        answer = call(api.port, "GET", "/v2/health/ready")
        assert (answer.status, answer.json()) == (400, {"ready": False})
        answer = call(api.port, "GET", "/v2/models/later/ready")
        assert (answer.status, answer.json()) == (400, {"name": "later", "ready": False})
        assert call(api.port, "GET", "/v2/models/main/ready").json() == {
            "name": "main",
            "ready": True,
        }
        answer = call(api.port, "GET", "/v2/models/later")
        assert answer.status == 503 and "has no model loaded" in answer.json()["error"]
        answer = infer_json(api, "later", det_doc())
        assert answer.status == 503
        assert call(api.port, "GET", "/healthz").status == 503
        assert backend.client_errors == {}
        backend.load("later", ModelRef("l", 1), lookup())
        assert call(api.port, "GET", "/v2/health/ready").status == 200
        assert call(api.port, "GET", "/healthz").json()["model"] == {"name": "m", "version": 2}


def test_model_metadata(oip_api: HttpApi) -> None:
    answer = call(oip_api.port, "GET", "/v2/models/det")
    assert answer.headers["X-Slimfleet-Model"] == "det@3"
    assert answer.json() == {
        "name": "det",
        "versions": ["3"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "mask", "datatype": "BOOL", "shape": [-1, 4]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "count", "datatype": "INT64", "shape": [-1]},
        ],
    }
    rec = call(oip_api.port, "GET", "/v2/models/rec/versions/5").json()
    assert rec["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [1, 3]}]
    assert rec["outputs"] == [{"name": "vec", "datatype": "FP16", "shape": [1, 3]}]
    assert call(oip_api.port, "GET", "/v2/models/rec/versions/5/ready").status == 200


def test_infer_with_json_tensors(oip_api: HttpApi) -> None:
    nested = {
        "id": "req-1",
        "inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.tolist()},
            {"name": "mask", "shape": [2, 4], "datatype": "BOOL", "data": MASK.tolist()},
        ],
    }
    answer = infer_json(oip_api, "det", nested)
    assert answer.status == 200
    assert answer.headers["X-Slimfleet-Tier"] == "det@3"
    assert answer.headers["X-Slimfleet-Model"] == "det@3"
    header, outputs = answer.oip()
    assert header["model_name"] == "det" and header["model_version"] == "3"
    assert header["id"] == "req-1"
    assert header["parameters"] == {"slimfleet_tier": "det@3", "slimfleet_model": "det@3"}
    assert [o["name"] for o in header["outputs"]] == ["y", "count"]
    assert header["outputs"][1] == {
        "name": "count",
        "datatype": "INT64",
        "shape": [2],
        "data": [2, 4],
    }
    np.testing.assert_array_equal(outputs["y"], Y)

    # only the outputs asked for, in that order; versioned path; FP16 out of INT64 in
    answer = infer_json(oip_api, "det", det_doc(outputs=[{"name": "count"}]))
    assert [o["name"] for o in answer.oip()[0]["outputs"]] == ["count"]
    answer = infer_json(
        oip_api, "rec", {"inputs": [tensor("ids", IDS)]}, "/v2/models/rec/versions/5/infer"
    )
    header, outputs = answer.oip()
    assert header["outputs"][0]["datatype"] == "FP16"
    np.testing.assert_array_equal(outputs["vec"], VEC)
    assert "id" not in header


def test_infer_with_binary_tensors(oip_api: HttpApi, oip_backend: OrtBackend) -> None:
    doc = {
        "id": "bin",
        "inputs": [tensor("x", X, binary=True), tensor("mask", MASK, binary=True)],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "count"}],
    }
    body, headers = binary_body(doc, X, MASK)
    answer = call(oip_api.port, "POST", "/v2/models/det/infer", body, headers)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"] == "application/octet-stream"
    header, outputs = answer.oip()
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 32}
    assert header["outputs"][1]["data"] == [2, 4]  # JSON, as asked
    np.testing.assert_array_equal(outputs["y"], Y)

    # binary_data_output answers every output in binary; JSON and binary inputs mix
    doc = {
        "inputs": [tensor("x", X), tensor("mask", MASK, binary=True)],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_body(doc, MASK)
    header, outputs = call(oip_api.port, "POST", "/v2/models/det/infer", body, headers).oip()
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [32, 16]
    np.testing.assert_array_equal(outputs["count"], COUNT)
    assert oip_backend.requests == {"det": 2}


def test_bytes_tensors_are_described_answered_but_not_taken() -> None:
    backend = OrtBackend(
        {"in": (ModelRef("i", 1), text_in()), "out": (ModelRef("o", 1), text_out())}
    )
    with HttpApi(backend) as api:
        meta = call(api.port, "GET", "/v2/models/in").json()
        assert meta["inputs"] == [{"name": "s", "datatype": "BYTES", "shape": [1]}]
        doc = {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
        answer = infer_json(api, "in", doc)
        assert answer.status == 400 and "BYTES tensors are not supported" in answer.json()["error"]
        x = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2]}]}
        out = infer_json(api, "out", x).json()["outputs"][0]
        assert (out["datatype"], out["shape"], out["data"]) == ("BYTES", [1, 2], ["1.5", "2"])
        x["outputs"] = [{"name": "t", "parameters": {"binary_data": True}}]
        answer = infer_json(api, "out", x)
        size = int(answer.headers["Inference-Header-Content-Length"])
        assert answer.body[size:] == struct.pack("<I", 3) + b"1.5" + struct.pack("<I", 1) + b"2"


class _KeepsFeeds(OrtBackend):
    """Keeps the feeds it was given, to see where their memory lives."""

    feeds: dict[str, np.ndarray]

    def predict(self, slot: str, feeds: Any, *, cast: bool = False) -> Any:
        self.feeds = dict(feeds)
        return super().predict(slot, feeds, cast=cast)


def test_binary_tensors_are_views_of_the_body_not_copies() -> None:
    backend = _KeepsFeeds({"det": (ModelRef("det", 3), masked_add())})
    with HttpApi(backend) as api:
        doc = {"inputs": [tensor("x", X, binary=True), tensor("mask", MASK, binary=True)]}
        body, headers = binary_body(doc, X, MASK)
        assert call(api.port, "POST", "/v2/models/det/infer", body, headers).status == 200
    x, mask = backend.feeds["x"], backend.feeds["mask"]

    def memory(array: Any) -> Any:
        while isinstance(array, np.ndarray):
            array = array.base
        return array

    assert isinstance(memory(x), memoryview) and isinstance(memory(x).obj, bytearray)
    assert memory(x).obj is memory(mask).obj  # both in the one buffer the body was read into
    assert len(memory(x).obj) == len(body)
    np.testing.assert_array_equal(x, X)


def test_npy_shortcut(oip_api: HttpApi) -> None:
    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    headers = {"Content-Type": "application/x-npy"}
    answer = call(oip_api.port, "POST", "/v2/models/rec/infer", npy(IDS.astype(np.int32)), headers)
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/x-npy"
    assert answer.headers["X-Slimfleet-Tier"] == "rec@5"
    np.testing.assert_array_equal(np.load(io.BytesIO(answer.body)), VEC)
    headers["Accept"] = "application/x-npz"
    answer = call(oip_api.port, "POST", "/v2/models/rec/infer", npy(IDS), headers)
    with np.load(io.BytesIO(answer.body)) as outputs:
        assert outputs.files == ["vec"]
    answer = call(oip_api.port, "POST", "/v2/models/det/infer", npy(X), headers)
    assert answer.status == 400 and "single-input slot" in answer.json()["error"]
    fortran = np.asfortranarray(np.array([[2, 0, 1]], dtype=np.int64))
    answer = call(oip_api.port, "POST", "/v2/models/rec/infer", npy(fortran), headers)
    with np.load(io.BytesIO(answer.body)) as outputs:
        np.testing.assert_array_equal(outputs["vec"], VEC)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = [
        (b"\x93NUMPY junk", "not a .npy array"),
        (npy(IDS)[:-3], "takes 24 bytes after the header, the body has 21"),
        (buffer.getvalue(), "it holds objects"),
    ]
    for body, message in bad:
        answer = call(oip_api.port, "POST", "/v2/models/rec/infer", body, headers)
        assert answer.status == 400 and message in answer.json()["error"], answer.body


def test_metrics_come_from_the_backend(oip_api: HttpApi) -> None:
    assert infer_json(oip_api, "det", det_doc()).status == 200
    answer = call(oip_api.port, "GET", "/metrics")
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b'test_requests_total{slot="det"} 1' in answer.body


def test_concurrent_binary_and_json_requests_during_reloads(
    oip_api: HttpApi, oip_backend: OrtBackend
) -> None:
    failures: list[Any] = []
    versions: set[str] = set()
    body, headers = binary_body(
        {"inputs": [tensor("x", X, binary=True), tensor("mask", MASK, binary=True)]}, X, MASK
    )

    def client(binary: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", oip_api.port, timeout=30)  # keep-alive
        try:
            for _ in range(40):
                answer = (
                    call(oip_api.port, "POST", "/v2/models/det/infer", body, headers, conn)
                    if binary
                    else call(
                        oip_api.port,
                        "POST",
                        "/v2/models/det/infer",
                        json.dumps(det_doc()).encode(),
                        None,
                        conn,
                    )
                )
                if answer.status != 200:
                    failures.append(answer.body)
                    continue
                header, outputs = answer.oip()
                if not np.array_equal(outputs["y"], Y):
                    failures.append(outputs)
                versions.add(header["model_version"])
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for version in range(4, 8):
        oip_backend.load("det", ModelRef("det", version), masked_add())
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert versions <= {str(v) for v in range(3, 8)}
    assert oip_backend.requests["det"] == 160


def test_stop_closes_the_port_and_a_taken_port_is_an_error(oip_backend: OrtBackend) -> None:
    api = HttpApi(oip_backend)
    api.start()
    port = api.port
    with pytest.raises(SlimfleetError, match=f"cannot listen on 127.0.0.1:{port}"):
        HttpApi(oip_backend, port=port).start()
    kept_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert call(port, "GET", "/v2/health/live", conn=kept_alive).status == 200
    api.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    with pytest.raises((OSError, http.client.HTTPException)):  # open connections are closed too
        call(port, "GET", "/v2/health/live", conn=kept_alive)


def test_a_client_that_drops_mid_request_costs_no_traceback(
    oip_api: HttpApi, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="slimfleet.agent")
    body = json.dumps(det_doc()).encode()
    head = b"POST /v2/models/det/infer HTTP/1.1\r\nHost: x\r\n"
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", oip_api.port), timeout=10)
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        # close with a reset, as a killed client or a dropped link does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        deadline = time.monotonic() + 20
        while oip_api.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert oip_api.open_connections == 0, "the server still holds the dropped connection"
    assert "Traceback" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert call(oip_api.port, "GET", "/v2/health/live").status == 200
