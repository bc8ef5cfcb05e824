"""A bounded HTTP/1.1 server: a connection cap, a deadline per request, sized bodies.

Mechanics only; what the endpoints mean lives in :mod:`slimfleet.agent.serve`.

Bounds (all in :class:`HttpLimits`):

- ``max_connections`` open connections at once, each served by one thread. At the
  cap, a new connection takes the place of the open one that has waited longest for
  its next request or is still sending it (headers or body), if that has lasted at least
  ``EVICT_AFTER_S``: that one is closed. A
  client that holds slots by sending its requests slowly (slowloris) therefore loses
  them to anyone who sends a whole request; so does one that does not read its answer
  within ``UNREAD_ANSWER_S``. A request being computed is never cut.
  When every open connection is busy answering, the new one is answered ``503`` at
  once, without a thread, and closed (at most ``MAX_REFUSED_LINGERING`` refused sockets
  linger ``REFUSED_LINGER_S`` to read what the client sent, so it reads the 503 rather
  than a reset).
- ``idle_timeout_s``: how long a connection may wait before the first byte of a
  request (a keep-alive connection is closed quietly after that).
- ``request_timeout_s``: from a request's first byte, the whole request (request
  line, headers and body) must arrive within it, or the answer is ``408`` and the
  connection closes; a header line every 20 s does not keep it open. A response is
  written within the same time.
- Request lines and header lines are limited by :mod:`http.server` (64 KiB, 100
  headers; 414/431). Body limits are the caller's: :meth:`BoundedHandler.content_length`.
- ``max_inflight_bytes``: the bodies held at once, over all connections (each charged
  its size times what parsing it costs, see :meth:`BoundedHandler.read_body`), and the
  answers built in JSON (:meth:`BoundedHandler.charge`), until the request is answered. A body that does not fit is answered ``503`` before it is
  read. Bodies up to ``SMALL_BODY`` are not charged (at most ``max_connections`` of
  them), so ordinary small requests get through while big ones hog the budget.
- A body that is not read (an error answered before it) is drained, at most
  ``DRAIN_BYTES`` for at most ``DRAIN_S``, into a 64 KiB scratch buffer, so a client a
  little over a limit reads its 413 rather than a reset; then the connection closes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from slimfleet.agent.httplimits import ByteBudget, HttpLimits, MiB

log = logging.getLogger(__name__)

READ_BUFFER = 64 * 1024
DRAIN_S = 1.0
DRAIN_BYTES = 8 * MiB
SMALL_BODY = 64 * 1024
REFUSED_LINGER_S = 1.0
EVICT_AFTER_S = 1.0
"""A connection may lose its slot to a newcomer once it has waited this long for (or
spent this long sending) its request: a request sent at once is never cut."""
UNREAD_ANSWER_S = 5.0
"""Or once its answer has waited this long for the client to read it: 64 clients that
sent whole requests and never read the answers once held every slot (the writes block
up to ``request_timeout_s``, and they reconnected), so no one else got an answer."""
MAX_REFUSED_LINGERING = 256
JSON = "application/json"


class HttpError(Exception):
    """Answer the request with ``status`` and the JSON ``{"error": message}``."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestDeadline(Exception):
    """The request did not arrive within ``request_timeout_s`` of its first byte."""


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream: each receive waits ``idle_timeout_s`` before a
    request's first byte, and only until the request's deadline after it."""

    def __init__(self, sock: socket.socket, limits: HttpLimits) -> None:
        self._sock = sock
        self._limits = limits
        self.deadline: float | None = None  # None until the request's first byte

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:
            self._sock.settimeout(self._limits.idle_timeout_s)
        else:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise RequestDeadline
            self._sock.settimeout(remaining)
        try:
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            if self.deadline is None:
                raise  # idle: the connection is closed quietly
            raise RequestDeadline from None
        if count and self.deadline is None:
            self.deadline = time.monotonic() + self._limits.request_timeout_s
        return count


class _Writer(io.RawIOBase):
    """Writes go out whole (``sendall``), within the socket's timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(memoryview(data).cast("B"))


def _refusal() -> bytes:
    body = json.dumps({"error": "too many connections: retry later"}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


REFUSAL = _refusal()


class BoundedHttpServer(ThreadingHTTPServer):
    """A thread per connection, at most ``limits.max_connections`` of them."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen backlog: a burst waits for accept, not SYN retries

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BoundedHandler],
        limits: HttpLimits,
    ) -> None:
        self.limits = limits
        self.budget = ByteBudget(limits.max_inflight_bytes)
        self._connections_lock = threading.Lock()  # guards _connections
        # per connection: when it may be closed for a newcomer, None while it computes
        self._connections: dict[socket.socket, float | None] = {}
        """Open connection -> since when it has been waiting for (or reading) a request,
        or None while one is being answered."""
        # Refused sockets waiting to be closed; used only by the serve_forever thread
        # (process_request and service_actions run there) and by close_connections once
        # that thread has stopped, so it needs no lock.
        self._refused: deque[tuple[float, socket.socket]] = deque()
        super().__init__(address, handler)

    @property
    def open_connections(self) -> int:
        with self._connections_lock:
            return len(self._connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        victim = None
        with self._connections_lock:
            if len(self._connections) >= self.limits.max_connections:
                now = time.monotonic()
                waiting = {s: t for s, t in self._connections.items() if t is not None and t <= now}
                victim = min(waiting, key=waiting.__getitem__, default=None)
                if victim is not None:  # its thread ends on the shutdown below
                    del self._connections[victim]
            admitted = len(self._connections) < self.limits.max_connections
            if admitted:
                self._connections[request] = time.monotonic() + EVICT_AFTER_S
        if victim is not None:
            log.debug("HTTP connection closed for a new one: %d open", self.limits.max_connections)
            with contextlib.suppress(OSError):
                victim.shutdown(socket.SHUT_RDWR)
        if not admitted:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: socket.socket) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)

    def mark(self, request: socket.socket, *, answering: bool, writing: bool = False) -> bool:
        """Note that ``request`` (a connection) is computing an answer, writing one (it
        may be closed for a newcomer at the cap after :data:`UNREAD_ANSWER_S`), or waiting
        for (or reading) its next request (after :data:`EVICT_AFTER_S`). False when it
        was already closed for one (the caller stops)."""
        with self._connections_lock:
            if request not in self._connections:
                return False
            now = time.monotonic()
            if writing:
                self._connections[request] = now + UNREAD_ANSWER_S
            else:
                self._connections[request] = None if answering else now + EVICT_AFTER_S
            return True

    def _refuse(self, sock: socket.socket) -> None:
        log.debug("HTTP connection refused: %d open", self.limits.max_connections)
        try:
            sock.setblocking(False)
            sock.send(REFUSAL)  # a fresh socket's send buffer takes it whole
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self._refused) >= MAX_REFUSED_LINGERING:
            self._refused.popleft()[1].close()
        self._refused.append((time.monotonic() + REFUSED_LINGER_S, sock))

    def service_actions(self) -> None:
        """Read and drop what refused clients sent; close them at EOF or after the linger."""
        now = time.monotonic()
        keep: deque[tuple[float, socket.socket]] = deque()
        for until, sock in self._refused:
            try:
                done = sock.recv(READ_BUFFER) == b"" or now >= until
            except BlockingIOError:
                done = now >= until
            except OSError:
                done = True
            if done:
                sock.close()
            else:
                keep.append((until, sock))
        self._refused = keep

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What escapes a handler is a connection problem (see ``BoundedHandler.handle``):
        logged at debug level instead of a traceback on stderr."""
        log.debug("HTTP connection from %s failed", client_address[0], exc_info=True)

    def close_connections(self) -> None:
        """Shut every open and lingering connection (on stop)."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for _, sock in self._refused:
            sock.close()
        self._refused.clear()


class BoundedHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive under the server's limits, with JSON error answers.

    Subclasses route in ``do_GET``/``do_POST``, raise :class:`HttpError`, and override
    :meth:`client_error` to count 4xx answers."""

    server: BoundedHttpServer
    protocol_version = "HTTP/1.1"
    server_version = "slimfleet-agent"
    sys_version = ""  # no Python version in the Server header

    def setup(self) -> None:
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.limits = self.server.limits
        self._reader = _DeadlineReader(self.connection, self.limits)
        self.rfile = io.BufferedReader(self._reader, READ_BUFFER)
        self.wfile = _Writer(self.connection)  # type: ignore[assignment]
        self._body_pending = 0
        self._charged = 0  # bytes of the server's budget this request holds

    def handle(self) -> None:
        """Serve the connection; a client that disconnects or stalls just ends it."""
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as exc:
            self.close_connection = True
            log.debug("HTTP client %s went away: %s", self.client_address[0], exc)

    def handle_one_request(self) -> None:
        self._reader.deadline = None
        self._body_pending = 0
        self.server.mark(self.connection, answering=False)
        try:
            super().handle_one_request()
        except RequestDeadline:
            self.close_connection = True
            self._body_pending = 0
            self.fail(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the request did not arrive within {self.limits.request_timeout_s:g} s",
            )
        finally:
            self.server.budget.give(self._charged)
            self._charged = 0

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors :mod:`http.server` finds itself (bad request line, headers too long,
        unknown method), answered in JSON like every other error."""
        status = HTTPStatus.METHOD_NOT_ALLOWED if code == 501 else HTTPStatus(code)
        self.close_connection = True
        self.fail(status, message or status.phrase)

    # -- bodies ------------------------------------------------------------------------

    def parse_request(self) -> bool:
        """Note the declared body, so an answer given before reading it drains it (or
        closes the connection when its end cannot be known)."""
        if not super().parse_request():
            return False
        if len(set(self.headers.get_all("Content-Length") or [])) > 1:  # RFC 9112 6.3
            self.send_error(HTTPStatus.BAD_REQUEST, "conflicting Content-Length headers")
            return False
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None or not (length or "0").isdigit():
            self.close_connection = True
        elif length:
            self._body_pending = int(length)
        # a body still to come keeps it evictable (read_body); False: closed meanwhile
        if not self._body_pending and not self.server.mark(self.connection, answering=True):
            self.close_connection = True
            return False
        return True

    def content_length(self, limit: int, what: str) -> int:
        """The declared body size; 411 without one (chunked bodies are refused), 413
        over ``limit`` (answered before the body is read)."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise HttpError(
                HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: send Content-Length"
            )
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        if not length.isdigit():
            raise HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
        size = int(length)
        if size > limit:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{what} of {size} bytes is over the limit of {limit} bytes",
            )
        return size

    def charge(self, cost: int, what: str) -> None:
        """Charge ``cost`` more bytes to the server's budget until the request is
        answered (an answer as it is built); 503 when they do not fit."""
        if not self.server.budget.take(cost):
            raise HttpError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"busy: {what} costing {cost} bytes does not fit in the "
                f"{self.limits.max_inflight_bytes} bytes that requests may hold at once; "
                "retry later",
            )
        self._charged += cost

    def read_body(self, size: int, cost: int | None = None) -> bytearray:
        """The body, read once into one buffer of ``size`` bytes. ``cost`` (default
        ``size``) is charged to the server's budget until the request is answered: 503
        before reading when it does not fit."""
        cost = size if cost is None else cost
        if size > SMALL_BODY:
            self.charge(cost, "a body")
        body = bytearray(size)
        view = memoryview(body)
        got = 0
        while got < size:
            count = self.rfile.readinto(view[got:])
            if not count:
                self.close_connection = True
                self._body_pending = 0
                raise HttpError(
                    HTTPStatus.BAD_REQUEST, f"the body ended after {got} of {size} bytes"
                )
            got += count
        self._body_pending = 0
        self.server.mark(self.connection, answering=True)
        return body

    def _drain(self) -> None:
        """Drop an unread body (at most DRAIN_BYTES, DRAIN_S), so the client reads the answer."""
        left, self._body_pending = min(self._body_pending, DRAIN_BYTES), 0
        scratch = memoryview(bytearray(READ_BUFFER))
        self._reader.deadline = time.monotonic() + DRAIN_S
        with contextlib.suppress(RequestDeadline, OSError):
            while left > 0:
                count = self.rfile.readinto(scratch[: min(left, READ_BUFFER)])
                if not count:
                    break
                left -= count

    # -- answers -----------------------------------------------------------------------

    def client_error(self) -> None:
        """Called for every 4xx answer; the API counts it (never against a model)."""

    def fail(self, status: HTTPStatus, message: str) -> None:
        """Answer ``{"error": message}``; 4xx answers are counted by :meth:`client_error`."""
        if 400 <= status < 500:
            self.client_error()
        self.send_json(status, {"error": message})

    def send_json(
        self, status: HTTPStatus, doc: Any, headers: dict[str, str] | None = None
    ) -> None:
        self.send(status, JSON, [json.dumps(doc).encode()], headers)

    def send(
        self,
        status: HTTPStatus,
        kind: str,
        parts: list[bytes | memoryview],
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer with the body ``parts`` written in order (no join)."""
        self.server.mark(self.connection, answering=True)  # an early answer (404, 413...)
        if self._body_pending:
            self.close_connection = True
        self.connection.settimeout(self.limits.request_timeout_s)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(sum(len(memoryview(p).cast("B")) for p in parts)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.server.mark(self.connection, answering=True, writing=True)
        for part in parts:
            self.wfile.write(part)
        if self._body_pending:
            self._drain()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)
