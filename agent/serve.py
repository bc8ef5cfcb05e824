"""The agent's HTTP API: Open Inference Protocol v2 (KServe v2) over any InferenceBackend.

A slot of the deployment is a model in the protocol (``/v2/models/<slot>``); its
version is the version of the model serving the slot's first tier.

``GET /v2``
    Server metadata: name, version, extensions (``binary_tensor_data``).
``GET /v2/health/live``, ``GET /v2/health/ready``
    200 ``{"live": true}`` / ``{"ready": true}``; not ready (some slot has no model):
    400 ``{"ready": false}``, as the protocol says a 4xx means false. A health answer
    is not a client error.
``GET /v2/models/<slot>``, ``GET /v2/models/<slot>/ready``
    Model metadata (name, versions, platform ``onnxruntime_onnx``, inputs and outputs
    with datatype and shape, -1 for a free dimension); readiness as for the server.
``POST /v2/models/<slot>/infer``
    JSON tensors, or a JSON header of ``Inference-Header-Content-Length`` bytes followed
    by binary tensors (see :mod:`slimfleet.agent.oip`); the Content-Type is not looked
    at, except that ``application/x-npy`` sends a single-input slot a ``.npy`` body and
    answers the first output as ``.npy`` (``.npz`` of every output with ``Accept:
    application/x-npz``).
``/v2/models/<slot>/versions/<v>/...``
    The same, when ``v`` is the version serving; else 404.
``GET /metrics``
    Prometheus text (the backend's telemetry).
``GET /healthz``
    Kept for probes and scripts: 200 ``{"status": "ok", "models": {slot: ref}, "model":
    ref of the main slot}`` when ready, else 503 ``{"status": "not ready"}``.

Every inference answer names what produced it: headers ``X-Slimfleet-Tier`` and
``X-Slimfleet-Model: name@version`` (absent when the remote tier answered), and the
response ``parameters`` ``slimfleet_tier`` / ``slimfleet_model``.

Errors are ``{"error": "..."}``: 400 bad request, 404 unknown path, slot or version,
405, 408 request deadline, 411, 413 body over its limit, 415 compressed body, 503 no
model loaded, too many connections or too many bytes of bodies in flight, 500 the model
failed. Every 4xx is counted by ``backend.client_error(slot)`` and never against a
model. Limits: :class:`HttpLimits` (a JSON body is limited far below a binary one and
charged ``JSON_COST`` times its size against the in-flight budget: that is what parsing
it costs).
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import threading
from http import HTTPStatus
from importlib import metadata
from urllib.parse import unquote

import numpy as np

from slimfleet.agent import oip
from slimfleet.agent.deployment import SLOT_MAIN, http_url
from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.httplimits import JSON_COST, HttpLimits
from slimfleet.agent.httpserver import (
    JSON,
    BoundedHandler,
    BoundedHttpServer,
    HttpError,
    RequestDeadline,
)
from slimfleet.agent.inference import (
    Answer,
    FeedError,
    InferenceBackend,
    InferenceError,
    NoModelError,
    UnknownSlotError,
)
from slimfleet.agent.wire import ModelRef, loads_json

log = logging.getLogger(__name__)

NPY = "application/x-npy"
NPZ = "application/x-npz"
OCTETS = "application/octet-stream"
METRICS = "text/plain; version=0.0.4; charset=utf-8"
HEADER_LENGTH = "Inference-Header-Content-Length"
NPY_HEADER_MAX = 64 * 1024  # a .npy header past this is refused

_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?/?")
_GET_PATHS = ("/v2", "/v2/health/live", "/v2/health/ready", "/metrics", "/healthz")


def _version() -> str:
    try:
        return metadata.version("slimfleet")
    except metadata.PackageNotFoundError:
        return "unknown"


class HttpApi:
    """The HTTP API in front of an :class:`InferenceBackend`, on a thread of its own.

    ``port=0`` picks a free port; read the chosen one from :attr:`port` after
    :meth:`start`. ``limits`` bounds connections, time and body sizes.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: HttpLimits | None = None,
    ) -> None:
        self.backend = backend
        self.host = host
        self.limits = limits or HttpLimits()
        self.version = _version()
        self._requested_port = port
        self._server: BoundedHttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the HTTP API is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def open_connections(self) -> int:
        return self._server.open_connections if self._server else 0

    def start(self) -> None:
        """Bind and serve in a background thread; SlimfleetError if the port is taken."""
        if self._server is not None:
            return
        handler = type("Handler", (_Handler,), {"api": self})
        try:
            server = BoundedHttpServer((self.host, self._requested_port), handler, self.limits)
        except OSError as exc:
            raise SlimfleetError(
                f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror or exc}"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="slimfleet-http", daemon=True
        )
        self._thread.start()
        log.info("HTTP API on %s", self.url)

    def stop(self) -> None:
        """Stop accepting requests and close the socket and every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HttpApi:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _npy_array(body: bytearray) -> np.ndarray:
    """The array of a ``.npy`` body, as a view of the body (no copy); 400 otherwise."""
    head = io.BytesIO(memoryview(body)[:NPY_HEADER_MAX])
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
        else:
            raise ValueError(f"format version {version} is not supported")
    except (ValueError, OSError, EOFError) as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"body is not a .npy array: {exc}") from None
    if dtype.hasobject:
        raise HttpError(HTTPStatus.BAD_REQUEST, "body is not a .npy array: it holds objects")
    count = math.prod(shape)
    offset = head.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"body is not a .npy array: {dtype} {list(shape)} takes {count * dtype.itemsize} "
            f"bytes after the header, the body has {len(body) - offset}",
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def _tier_headers(answer: Answer) -> dict[str, str]:
    headers = {"X-Slimfleet-Tier": answer.tier}
    if answer.model is not None:
        headers["X-Slimfleet-Model"] = str(answer.model)
    return headers


class _Handler(BoundedHandler):
    api: HttpApi
    _slot: str | None = None  # the slot the path names, once parsed

    def handle_one_request(self) -> None:
        self._slot = None
        super().handle_one_request()

    # -- routing -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            match = _MODEL_PATH.fullmatch(path)
            if match:
                self._model_route(method, match)
            elif path.rstrip("/") in _GET_PATHS:
                self._allow(method, "GET")
                self._get(path.rstrip("/"))
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        except HttpError as exc:
            self.fail(exc.status, exc.message)
        except UnknownSlotError as exc:
            self.fail(HTTPStatus.NOT_FOUND, str(exc))
        except NoModelError as exc:
            self.fail(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except (FeedError, oip.ProtocolError) as exc:
            self.fail(HTTPStatus.BAD_REQUEST, str(exc))
        except InferenceError as exc:
            self.fail(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
        except (ConnectionError, TimeoutError, RequestDeadline):  # handled per connection
            raise
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("HTTP %s %s failed", self.command, path)
            self.fail(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")

    def _allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} {self.path} is not supported: use {allowed}",
            )

    def client_error(self) -> None:
        slot = self._slot if self._slot in self.api.backend.slots() else None
        self.api.backend.client_error(slot)

    # -- server-level endpoints --------------------------------------------------------

    def _get(self, path: str) -> None:
        backend = self.api.backend
        if path == "/v2":
            self.send_json(HTTPStatus.OK, oip.server_metadata(self.api.version))
        elif path == "/v2/health/live":
            self.send_json(HTTPStatus.OK, {"live": True})
        elif path == "/v2/health/ready":
            ready = backend.ready()
            self.send_json(HTTPStatus.OK if ready else HTTPStatus.BAD_REQUEST, {"ready": ready})
        elif path == "/metrics":
            self.send(HTTPStatus.OK, METRICS, [backend.metrics_text()])
        else:
            self._healthz()

    def _healthz(self) -> None:
        backend = self.api.backend
        if not backend.ready():
            self.send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not ready"})
            return
        models = {}
        for slot in backend.slots():
            try:
                models[slot] = backend.slot_model(slot).to_dict()
            except NoModelError:  # the deployment changed between the two calls
                continue
        doc = {"status": "ok", "models": models, "model": models.get(SLOT_MAIN)}
        self.send_json(HTTPStatus.OK, doc)

    # -- model endpoints ---------------------------------------------------------------

    def _model_route(self, method: str, match: re.Match[str]) -> None:
        slot, version, action = (unquote(g) if g else g for g in match.groups())
        self._slot = slot
        self._allow(method, "POST" if action == "infer" else "GET")
        if action == "ready":
            self._model_ready(slot, version)
            return
        model = self._resolve(slot, version)
        if action == "infer":
            self._infer(slot)
        else:
            io_ = self.api.backend.slot_io(slot)
            self.send_json(
                HTTPStatus.OK,
                oip.model_metadata(slot, model, io_),
                {"X-Slimfleet-Model": str(model)},
            )

    def _resolve(self, slot: str, version: str | None) -> ModelRef:
        """The slot's serving model; 404 when the path names another version."""
        model = self.api.backend.slot_model(slot)
        if version is not None and version != str(model.version):
            raise HttpError(
                HTTPStatus.NOT_FOUND,
                f"slot {slot!r} serves version {model.version}, not {version!r}",
            )
        return model

    def _model_ready(self, slot: str, version: str | None) -> None:
        """200 ready; a known slot with nothing loaded is 400 ``ready: false`` (the
        protocol's false, not a client error)."""
        try:
            self._resolve(slot, version)
        except UnknownSlotError:
            raise
        except NoModelError:
            self.send_json(HTTPStatus.BAD_REQUEST, {"name": slot, "ready": False})
            return
        self.send_json(HTTPStatus.OK, {"name": slot, "ready": True})

    def _infer(self, slot: str) -> None:
        kind = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise HttpError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Encoding {encoding} is not supported: send the body uncompressed",
            )
        if kind == NPY:
            self._infer_npy(slot)
            return
        limits = self.limits
        declared = self.headers.get(HEADER_LENGTH)
        if declared is None:
            size = self.content_length(limits.max_json_bytes, "JSON body")
            header_size = size
        else:
            size = self.content_length(limits.max_binary_bytes, "body")
            if not declared.isdigit() or not 0 < int(declared) <= size:
                raise HttpError(
                    HTTPStatus.BAD_REQUEST,
                    f"{HEADER_LENGTH} {declared!r} must be a positive number of bytes "
                    f"within the body's {size}",
                )
            header_size = int(declared)
            if header_size > limits.max_json_bytes:
                raise HttpError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"JSON header of {header_size} bytes is over the limit of "
                    f"{limits.max_json_bytes} bytes",
                )
        body = self.read_body(size, cost=size + (JSON_COST - 1) * header_size)
        view = memoryview(body)
        try:
            doc = loads_json(view[:header_size].tobytes())
        except ValueError as exc:
            raise HttpError(
                HTTPStatus.BAD_REQUEST, f"the JSON header is not valid: {exc}"
            ) from None
        request = oip.parse_infer(doc, view[header_size:], self.api.backend.slot_io(slot))
        answer = self.api.backend.predict(slot, request.feeds)
        cost = oip.json_answer_cost(request, answer)
        if cost > limits.max_inflight_bytes:
            raise oip.ProtocolError(
                f"the answer would hold {cost} bytes as JSON, over the "
                f"{limits.max_inflight_bytes} all requests may hold at once: ask for binary "
                'data ("parameters": {"binary_data_output": true})'
            )
        self.charge(cost, "the JSON answer")
        header, parts = oip.infer_response(slot, request, answer)
        head = json.dumps(header).encode()
        headers = _tier_headers(answer)
        if parts:
            headers[HEADER_LENGTH] = str(len(head))
        self.send(HTTPStatus.OK, OCTETS if parts else JSON, [head, *parts], headers)

    def _infer_npy(self, slot: str) -> None:
        array = _npy_array(
            self.read_body(self.content_length(self.limits.max_binary_bytes, ".npy body"))
        )
        inputs = self.api.backend.slot_io(slot).inputs
        if len(inputs) != 1:
            names = ", ".join(s.name for s in inputs)
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                f"a .npy body needs a single-input slot; {slot!r} takes {names}: send JSON",
            )
        answer = self.api.backend.predict(slot, {inputs[0].name: array}, cast=True)
        buffer = io.BytesIO()
        if NPZ in (self.headers.get("Accept") or ""):
            np.savez(buffer, **answer.outputs)
            kind = NPZ
        else:
            np.save(buffer, next(iter(answer.outputs.values())), allow_pickle=False)
            kind = NPY
        self.send(HTTPStatus.OK, kind, [buffer.getbuffer()], _tier_headers(answer))
