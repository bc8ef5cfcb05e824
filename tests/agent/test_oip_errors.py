"""Requests the HTTP API must refuse: each a one-line 4xx counted as a client error of
its slot (never against a model), while a model's own failure is a 500 that is."""

from __future__ import annotations

import json
import socket
from typing import Any

import numpy as np
import pytest
from oip_rig import OrtBackend, call, tensor

from slimfleet.agent.serve import HttpApi

IDS = np.array([[2, 0, 1]], dtype=np.int64)


def infer_json(api: HttpApi, slot: str, doc: Any) -> Any:
    return call(api.port, "POST", f"/v2/models/{slot}/infer", json.dumps(doc).encode())


def _input(name: str, shape: list[int], datatype: str, data: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


_X = _input("x", [1, 4], "FP32", [1, 2, 3, 4])
_M = _input("mask", [1, 4], "BOOL", [True, True, False, False])
# (id, slot, body, status, message): every one a client error of that slot
BAD_INFERS: list[tuple[str, str, Any, int, str]] = [
    ("not json", "det", b"{inputs", 400, "the JSON header is not valid"),
    ("deep", "det", b"[" * 200_000 + b"]" * 200_000, 400, "nested too deeply"),
    ("a list", "det", [1], 400, "must be a JSON object"),
    ("no inputs", "det", {"id": "a"}, 400, "inputs must be a non-empty list"),
    ("empty inputs", "det", {"inputs": []}, 400, "inputs must be a non-empty list"),
    ("input not object", "det", {"inputs": [1]}, 400, "inputs[0] must be a JSON object"),
    ("unknown input", "det", {"inputs": [{**_X, "name": "z"}]}, 400, "not an input of the model"),
    ("twice", "det", {"inputs": [_X, _X, _M]}, 400, "given twice"),
    ("missing input", "det", {"inputs": [_X]}, 400, "takes inputs"),
    (
        "wrong datatype",
        "det",
        {"inputs": [{**_X, "datatype": "FP64"}, _M]},
        400,
        "the model takes FP32",
    ),
    ("bytes", "det", {"inputs": [{**_X, "datatype": "BYTES"}, _M]}, 400, "BYTES tensors are not"),
    ("bad shape", "det", {"inputs": [{**_X, "shape": [1, -4]}, _M]}, 400, "integers from 0 to"),
    ("huge dim", "det", {"inputs": [{**_X, "shape": [10**30, 0]}, _M]}, 400, "integers from 0 to"),
    ("shape count", "det", {"inputs": [{**_X, "shape": [2, 4]}, _M]}, 400, "needs 8"),
    ("ragged", "det", {"inputs": [{**_X, "data": [[1, 2], [3]]}, _M]}, 400, "ragged"),
    (
        "strings",
        "det",
        {"inputs": [{**_X, "data": ["a", "b", "c", "d"]}, _M]},
        400,
        "must hold numbers",
    ),
    (
        "bools as FP32",
        "det",
        {"inputs": [{**_X, "data": [True] * 4}, _M]},
        400,
        "must hold numbers",
    ),
    (
        "bools among FP32",
        "det",
        {"inputs": [{**_X, "data": [[1.5, True], [0, 2]]}, _M]},
        400,
        "must hold numbers",
    ),
    (
        "bools among INT64",
        "rec",
        {"inputs": [_input("ids", [1, 3], "INT64", [1, False, 2])]},
        400,
        "must hold integers",
    ),
    (
        "numbers as BOOL",
        "det",
        {"inputs": [_X, {**_M, "data": [1, 0, 1, 0]}]},
        400,
        "must hold booleans",
    ),
    (
        "floats as INT64",
        "rec",
        {"inputs": [_input("ids", [1, 3], "INT64", [0.5, 1, 2])]},
        400,
        "must hold integers",
    ),
    (
        "huge INT64",
        "rec",
        {"inputs": [_input("ids", [1, 3], "INT64", [2**70, 1, 2])]},
        400,
        "must hold integers",
    ),
    (
        "model shape",
        "rec",
        {"inputs": [_input("ids", [1, 4], "INT64", [0, 1, 2, 0])]},
        400,
        "expected [1, 3]",
    ),
    (
        "no data",
        "det",
        {"inputs": [{k: v for k, v in _X.items() if k != "data"}, _M]},
        400,
        "neither data",
    ),
    ("id not string", "det", {"id": 7, "inputs": [_X, _M]}, 400, "id must be a string"),
    (
        "unknown output",
        "det",
        {"inputs": [_X, _M], "outputs": [{"name": "w"}]},
        400,
        "must name an output",
    ),
    (
        "classification",
        "det",
        {"inputs": [_X, _M], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
        400,
        "'classification' is not supported",
    ),
    (
        "shared memory",
        "det",
        {"inputs": [{**_X, "parameters": {"shared_memory_region": "r"}}, _M]},
        400,
        "'shared_memory_region' is not supported",
    ),
    (
        "binary_data_output",
        "det",
        {"inputs": [_X, _M], "parameters": {"binary_data_output": "yes"}},
        400,
        "must be a boolean",
    ),
    (
        "shape deeper than numpy allows",  # was a 500 and a traceback in the agent's log
        "det",
        {"inputs": [{**_X, "shape": [1] * 10000, "data": [1.0]}, _M]},
        400,
        "shape has 10000 dimensions, at most 32",
    ),
    (
        "nested too deeply",  # was a RecursionError
        "det",
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "nested too deeply",
    ),
    ("unknown slot", "nope", {"inputs": [_X, _M]}, 404, "no slot 'nope'"),
]


@pytest.mark.parametrize(
    ("slot", "body", "status", "message"),
    [b[1:] for b in BAD_INFERS],
    ids=[b[0] for b in BAD_INFERS],
)
def test_bad_requests_are_client_errors_never_model_errors(
    oip_api: HttpApi, oip_backend: OrtBackend, slot: str, body: Any, status: int, message: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = call(oip_api.port, "POST", f"/v2/models/{slot}/infer", raw)
    assert answer.status == status, answer.body
    assert message in answer.json()["error"]
    assert oip_backend.client_errors == {(slot if slot != "nope" else None): 1}
    assert oip_backend.model_errors == {}
    assert infer_json(oip_api, "det", {"inputs": [_X, _M]}).status == 200  # the server lives on


def _binary(
    doc: dict[str, Any], data: bytes, header_length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(doc).encode()
    return head + data, {"Inference-Header-Content-Length": header_length or str(len(head))}


_BX = {**_X, "parameters": {"binary_data_size": 16}}
_BX.pop("data")
BAD_BINARY = [
    (
        "size not shape",
        {"inputs": [{**_BX, "parameters": {"binary_data_size": 12}}, _M]},
        b"\0" * 12,
        None,
        "takes 16 bytes",
    ),
    ("short data", {"inputs": [_BX, _M]}, b"\0" * 10, None, "needs bytes 0 to 16"),
    ("extra data", {"inputs": [_BX, _M]}, b"\0" * 20, None, "the inputs declare 16"),
    (
        "data and binary",
        {"inputs": [{**_BX, "data": [1, 2, 3, 4]}, _M]},
        b"\0" * 16,
        None,
        "both data and",
    ),
    ("header past body", {"inputs": [_BX, _M]}, b"\0" * 16, "99999", "within the body"),
    ("header length words", {"inputs": [_BX, _M]}, b"\0" * 16, "ten", "must be a positive number"),
    ("header cut", {"inputs": [_BX, _M]}, b"\0" * 16, "5", "the JSON header is not valid"),
]


@pytest.mark.parametrize(
    ("doc", "data", "length", "message"),
    [b[1:] for b in BAD_BINARY],
    ids=[b[0] for b in BAD_BINARY],
)
def test_bad_binary_requests(
    oip_api: HttpApi,
    oip_backend: OrtBackend,
    doc: Any,
    data: bytes,
    length: str | None,
    message: str,
) -> None:
    body, headers = _binary(doc, data, length)
    answer = call(oip_api.port, "POST", "/v2/models/det/infer", body, headers)
    assert answer.status == 400 and message in answer.json()["error"], answer.body
    assert oip_backend.client_errors == {"det": 1} and oip_backend.model_errors == {}


def test_protocol_errors(oip_api: HttpApi, oip_backend: OrtBackend) -> None:
    port = oip_api.port
    cases = [
        (call(port, "GET", "/v2/models/det/infer"), 405, "use POST"),
        (call(port, "POST", "/v2/health/live", b"{}"), 405, "use GET"),
        (call(port, "DELETE", "/v2"), 405, "Unsupported method"),
        (call(port, "GET", "/nowhere"), 404, "no such endpoint: /nowhere"),
        (call(port, "GET", "/v2/models/det/versions/2"), 404, "serves version 3, not '2'"),
        (
            call(port, "POST", "/v2/models/det/infer", b"x=1", {"Content-Type": "text/plain"}),
            400,
            "the JSON header is not valid",
        ),
        (
            call(port, "POST", "/v2/models/det/infer", b"{}", {"Content-Encoding": "gzip"}),
            415,
            "gzip is not supported",
        ),
    ]
    for answer, status, message in cases:
        assert answer.status == status and message in answer.json()["error"], answer.body
    assert oip_backend.client_errors == {None: 3, "det": 4}
    # no Content-Length: answered before any body is read
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/det/infer HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 411")


def test_a_model_failure_is_500_and_counts_against_the_model(
    oip_api: HttpApi, oip_backend: OrtBackend
) -> None:
    answer = infer_json(oip_api, "rec", {"inputs": [tensor("ids", np.array([[0, 1, 7]]))]})
    assert answer.status == 500 and "rec: rec@5 failed" in answer.json()["error"].replace("'", "")
    assert oip_backend.model_errors == {"rec": 1} and oip_backend.client_errors == {}
    assert infer_json(oip_api, "rec", {"inputs": [tensor("ids", IDS)]}).status == 200
