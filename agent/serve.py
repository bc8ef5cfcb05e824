"""The local HTTP API: predict with JSON or ``.npy``, health and Prometheus metrics.

``POST /v1/predict``
    ``Content-Type: application/json`` with ``{"inputs": {name: nested list}}``: each
    input is converted to the model's input dtype; the answer is
    ``{"model": {"name", "version"}, "outputs": {name: nested list}}``.

    ``Content-Type: application/x-npy`` with a ``.npy`` file (single-input models):
    the answer is a ``.npy`` of the first output, or a ``.npz`` with every output when
    the request says ``Accept: application/x-npz``. The model is named in the
    ``X-Slimfleet-Model: name@version`` header.
``GET /healthz``
    200 ``{"status": "ok", "model": {...}}`` while a model serves, else 503.
``GET /metrics``
    Prometheus text format.

Errors are JSON ``{"error": "..."}``: 400 bad body or feeds, 404, 405, 411 no
Content-Length, 413 body too big, 415 other content types, 500 the model failed,
503 no model. A failing request never stops the server; a client that disconnects
or stalls for ``REQUEST_TIMEOUT_S`` loses its connection (logged at debug level).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.inference import FeedError, NoModelError
from slimfleet.agent.inference import InferenceBackend as Serving
from slimfleet.agent.wire import ModelRef

log = logging.getLogger(__name__)

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
METRICS = "text/plain; version=0.0.4; charset=utf-8"
MAX_BODY_BYTES = 64 * 1024 * 1024
REQUEST_TIMEOUT_S = 30


class _HttpError(Exception):
    """Internal: answer the request with ``status`` and a JSON error."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpApi:
    """The local HTTP API in front of a :class:`Serving`, on a thread of its own.

    ``port=0`` picks a free port; read the chosen one from :attr:`port` after
    :meth:`start`.
    """

    def __init__(
        self,
        serving: Serving,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.serving = serving
        self.host = host
        self.max_body_bytes = max_body_bytes
        self._requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the HTTP API is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a background thread; SlimfleetError if the port is taken."""
        if self._server is not None:
            return
        handler = type("Handler", (_Handler,), {"api": self})
        try:
            server = _Server((self.host, self._requested_port), handler)
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


class _Server(ThreadingHTTPServer):
    """A threading server that can close its keep-alive connections on stop."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What escapes a handler is a connection problem (see ``_Handler.handle``):
        logged at debug level instead of a traceback on stderr."""
        log.debug("HTTP connection from %s failed", client_address[0], exc_info=True)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    api: HttpApi
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server_version = "slimfleet-agent"

    def handle(self) -> None:
        """Serve the connection; a client that disconnects or stalls just ends it."""
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as exc:
            self.close_connection = True
            log.debug("HTTP client %s went away: %s", self.client_address[0], exc)

    # -- routing --------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch({"/healthz": self._healthz, "/metrics": self._metrics})

    def do_POST(self) -> None:
        self._dispatch({"/v1/predict": self._predict})

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        try:
            route = routes.get(path)
            if route is None:
                known = path in ("/healthz", "/metrics", "/v1/predict")
                raise _HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND,
                    f"{self.command} {path} is not supported"
                    if known
                    else f"no such endpoint: {path}",
                )
            route()
        except _HttpError as exc:
            self._send_json(exc.status, {"error": exc.message})
        except (ConnectionError, TimeoutError):  # the client went away: nobody to answer
            raise
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("HTTP %s %s failed", self.command, path)
            self._send_json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}"}
            )

    # -- endpoints ------------------------------------------------------------------

    def _healthz(self) -> None:
        current = self.api.serving.current
        if current is None:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "no model"})
        else:
            self._send_json(HTTPStatus.OK, {"status": "ok", "model": current.to_dict()})

    def _metrics(self) -> None:
        self._send(HTTPStatus.OK, METRICS, self.api.serving.telemetry.metrics_text())

    def _predict(self) -> None:
        body = self._read_body()
        kind = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if kind == JSON:
            self._predict_json(body)
        elif kind == NPY:
            self._predict_npy(body)
        else:
            raise _HttpError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type must be {JSON} or {NPY}, got {kind or 'none'}",
            )

    def _predict_json(self, body: bytes) -> None:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
            raise _HttpError(
                HTTPStatus.BAD_REQUEST, 'body must be {"inputs": {"<input name>": [...]}}'
            )
        model, outputs = self._infer(doc["inputs"])
        answer = {"model": model.to_dict(), "outputs": {k: v.tolist() for k, v in outputs.items()}}
        self._send_json(HTTPStatus.OK, answer)

    def _predict_npy(self, body: bytes) -> None:
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"body is not a .npy array: {exc}") from None
        if not isinstance(array, np.ndarray):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "body must be a single .npy array, not .npz")
        model_io = self.api.serving.io
        if model_io is None:
            raise _HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no model is loaded")
        if len(model_io.inputs) != 1:
            names = ", ".join(s.name for s in model_io.inputs)
            raise _HttpError(
                HTTPStatus.BAD_REQUEST,
                f"a .npy body needs a single-input model; this one takes {names}: send JSON",
            )
        model, outputs = self._infer({model_io.inputs[0].name: array})
        buffer = io.BytesIO()
        if NPZ in (self.headers.get("Accept") or ""):
            np.savez(buffer, **outputs)
            kind = NPZ
        else:
            np.save(buffer, next(iter(outputs.values())), allow_pickle=False)
            kind = NPY
        self._send(HTTPStatus.OK, kind, buffer.getvalue(), {"X-Slimfleet-Model": str(model)})

    # -- helpers --------------------------------------------------------------------

    def _infer(self, feeds: dict[str, Any]) -> tuple[ModelRef, dict[str, np.ndarray]]:
        try:
            return self.api.serving.predict(feeds, cast=True)
        except FeedError as exc:
            raise _HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        except NoModelError as exc:
            raise _HttpError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
        except SlimfleetError as exc:
            raise _HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc)) from None

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        if size < 0 or size > self.api.max_body_bytes:
            self.close_connection = True
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {size} bytes is over the limit of {self.api.max_body_bytes}",
            )
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            raise _HttpError(HTTPStatus.BAD_REQUEST, "body is shorter than its Content-Length")
        return body

    def _send_json(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
        self._send(status, JSON, json.dumps(doc).encode())

    def _send(
        self,
        status: HTTPStatus,
        kind: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)
