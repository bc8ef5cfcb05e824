"""The remote tier of a fallback chain: the user's own server, over the Open Inference
Protocol v2 (KServe v2) JSON API.

A request is POSTed as ``{"inputs": [{"name", "shape", "datatype", "data"}]}`` to the URL
the slot names in full (``http(s)://host:port/v2/models/<model>/infer``); the answer's
``outputs`` become the tier's outputs by name. Bounds, all per request:

- the whole exchange (connect, send, wait, read) must finish within the slot's
  ``timeout_s`` (:class:`slimfleet.agent.deployment.RemoteTier`, at most 60 s), else
  :class:`~slimfleet.agent.chain.TierTimeout`;
- an answer over :data:`MAX_RESPONSE_BYTES` is refused unread (by its Content-Length)
  or as soon as it passes the cap;
- only ``http`` and ``https`` URLs (https verifies the server's certificate); no
  redirects are followed.

A circuit breaker keeps a dead server from costing every request its timeout: after
:data:`FAILURES_TO_OPEN` consecutive failures (timeouts, connection errors, non-2xx
answers, answers that are not OIP v2) it opens and the tier fails at once for
:data:`OPEN_SECONDS`; then it lets one trial request through (half-open): success closes
it, failure opens it for another :data:`OPEN_SECONDS`. Each opening calls
``on_event(EVENT_TIER_FAILING, reason)`` and a close after an opening calls
``on_event(EVENT_TIER_RECOVERED, reason)``: at most one event per :data:`OPEN_SECONDS`
while the server is down, so a dead server cannot flood the events topic.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from slimfleet.agent.chain import REMOTE_LABEL, TierTimeout, first_line
from slimfleet.agent.deployment import RemoteTier, split_http_url
from slimfleet.agent.errors import ConfigError
from slimfleet.agent.inference import InferenceError
from slimfleet.agent.wire import EVENT_TIER_FAILING, EVENT_TIER_RECOVERED, loads_json

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 16 * 1024**2
"""Largest answer body read from the remote server (16 MiB)."""
FAILURES_TO_OPEN = 3
"""Consecutive failures that open the circuit breaker."""
OPEN_SECONDS = 30.0
"""How long an open breaker fails requests at once before it lets a trial through."""
READ_CHUNK = 64 * 1024

# Open Inference Protocol datatypes <-> numpy
_DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_NAMES = {np.dtype(t): name for name, t in _DATATYPES.items()}

OnEvent = Callable[[str, str], None]


def encode_request(feeds: dict[str, np.ndarray]) -> bytes:
    """The OIP v2 JSON body for ``feeds``; an InferenceError for a dtype OIP JSON lacks."""
    inputs = []
    for name, value in feeds.items():
        array = np.asarray(value)
        datatype = _NAMES.get(array.dtype)
        if datatype is None:
            raise InferenceError(f"remote: cannot send input {name!r} of dtype {array.dtype}")
        inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "data": array.ravel().tolist(),
            }
        )
    return json.dumps({"inputs": inputs}).encode()


def decode_response(body: bytes) -> dict[str, np.ndarray]:
    """The outputs of an OIP v2 JSON answer; ValueError saying what is wrong."""
    doc = loads_json(body)
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise ValueError("no 'outputs' list")
    result = {}
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ValueError(f"outputs[{i}] has no name")
        name, shape, datatype = out["name"], out.get("shape"), out.get("datatype")
        if datatype not in _DATATYPES:
            raise ValueError(f"output {name!r}: unsupported datatype {datatype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"output {name!r}: shape must be a list of sizes")
        data = np.asarray(out.get("data"), dtype=_DATATYPES[datatype]).ravel()
        if data.size != math.prod(shape):
            raise ValueError(f"output {name!r}: {data.size} values for shape {shape}")
        result[name] = data.reshape(shape)
    return result


class RemoteClient:
    """The remote tier of one slot (see the module docstring). Thread-safe: each request
    opens its own connection; only the breaker's fields are shared."""

    label = REMOTE_LABEL

    def __init__(
        self,
        spec: RemoteTier,
        on_event: OnEvent | None = None,
        *,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        try:
            url = split_http_url(spec.url)
        except ValueError as exc:
            raise ConfigError(f"remote url: {exc}") from None
        if not (math.isfinite(spec.timeout_s) and spec.timeout_s > 0):
            raise ConfigError(f"remote timeout_s {spec.timeout_s!r}: expected seconds > 0")
        self.spec = spec
        self._url = url
        self._on_event = on_event
        self._max_bytes = max_response_bytes
        self._clock = clock
        # _lock guards _failures, _opened_at and _trial: the breaker's state.
        self._lock = threading.Lock()
        self._failures = 0  # consecutive failures
        self._opened_at: float | None = None  # when the breaker last opened; None: closed
        self._trial = False  # a half-open trial request is in flight

    # -- the breaker --------------------------------------------------------------------

    def _admit(self) -> bool:
        """Let a request through (True when it is the half-open trial), or raise at once
        while the breaker is open."""
        with self._lock:
            if self._opened_at is None:
                return False
            wait = self._opened_at + OPEN_SECONDS - self._clock()
            if wait <= 0 and not self._trial:
                self._trial = True
                return True
        left = f"next try in {max(wait, 0):.0f} s" if wait > 0 else "a trial is in flight"
        raise InferenceError(
            f"remote: circuit open after {FAILURES_TO_OPEN} consecutive failures ({left})"
        )

    def _succeeded(self) -> None:
        with self._lock:
            recovered = self._opened_at is not None
            self._failures, self._opened_at, self._trial = 0, None, False
        if recovered:
            self._emit(EVENT_TIER_RECOVERED, f"{self.spec.url} answers again")

    def _failed(self, reason: str, trial: bool) -> None:
        with self._lock:
            self._failures += 1
            opens = trial or (self._opened_at is None and self._failures >= FAILURES_TO_OPEN)
            if opens:
                self._opened_at = self._clock()
            if trial:
                self._trial = False
        if opens:
            self._emit(
                EVENT_TIER_FAILING,
                f"{self.spec.url}: {reason}; circuit open for {OPEN_SECONDS:.0f} s",
            )

    def _emit(self, event: str, reason: str) -> None:
        log.warning("remote tier %s: %s", event, reason)
        if self._on_event is not None:
            try:
                self._on_event(event, reason)
            except Exception:  # reporting must never fail a request
                log.exception("remote tier: the event callback failed")

    @property
    def open(self) -> bool:
        """True while the breaker fails requests without asking the server."""
        with self._lock:
            return self._opened_at is not None

    # -- a request ----------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """POST ``feeds`` to the server; its outputs, or TierTimeout / InferenceError."""
        body = encode_request(feeds)  # the request's fault, not the server's: no count
        trial = self._admit()
        try:
            outputs = self._exchange(body)
        except Exception as exc:  # whatever happened, the breaker must hear of it
            self._failed(first_line(exc), trial)
            if isinstance(exc, InferenceError):
                raise
            raise InferenceError(f"remote: {type(exc).__name__}: {first_line(exc)}") from None
        self._succeeded()
        return outputs

    def _exchange(self, body: bytes) -> dict[str, np.ndarray]:
        deadline = self._clock() + self.spec.timeout_s
        timeout = f"remote: no answer within {self.spec.timeout_s:g} s"
        kind = (
            http.client.HTTPSConnection
            if self._url.scheme == "https"
            else http.client.HTTPConnection
        )
        connection = kind(self._url.hostname, self._url.port, timeout=self.spec.timeout_s)
        path = self._url.path or "/"
        if self._url.query:
            path += "?" + self._url.query
        try:
            connection.request("POST", path, body, headers={"Content-Type": "application/json"})
            sock = connection.sock  # the response reads from it, even after a close
            _remaining(sock, deadline, self._clock, timeout)
            response = connection.getresponse()
            data = self._read(response, sock, deadline, timeout)
        except TimeoutError:
            raise TierTimeout(timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise InferenceError(f"remote: {type(exc).__name__}: {first_line(exc)}") from None
        finally:
            connection.close()
        if not 200 <= response.status < 300:
            raise InferenceError(f"remote: HTTP {response.status}: {_error_text(data)}")
        try:
            return decode_response(data)
        except (ValueError, TypeError) as exc:  # loads_json: deep nesting too
            raise InferenceError(f"remote: not an OIP v2 answer: {first_line(exc)}") from None

    def _read(
        self, response: http.client.HTTPResponse, sock: socket.socket, deadline: float, timeout: str
    ) -> bytes:
        """The body, within the deadline and the response size cap."""
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._max_bytes:
            raise InferenceError(
                f"remote: the answer is {int(length)} bytes, over the {self._max_bytes} cap"
            )
        parts, size = [], 0
        while True:
            _remaining(sock, deadline, self._clock, timeout)
            chunk = response.read1(READ_CHUNK)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > self._max_bytes:
                raise InferenceError(f"remote: the answer is over the {self._max_bytes} byte cap")
            parts.append(chunk)


def _remaining(
    sock: socket.socket, deadline: float, clock: Callable[[], float], timeout: str
) -> None:
    """Let the next socket operation wait only until ``deadline``; TierTimeout if past."""
    left = deadline - clock()
    if left <= 0:
        raise TierTimeout(timeout)
    sock.settimeout(left)


def _error_text(body: bytes) -> str:
    """The ``error`` field of an OIP error answer, else the body's first line (bounded)."""
    try:
        doc: Any = loads_json(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"][:200]
    except ValueError:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "(empty body)"
