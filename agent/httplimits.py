"""The values of the HTTP server's bounds, and the byte budget the requests in flight
share (what each bound means: :mod:`slimfleet.agent.httpserver`). Agent.yaml's
``http:`` section fills :class:`HttpLimits`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

MiB = 1024 * 1024
JSON_COST = 10  # peak memory to parse JSON tensors per byte of text (measured 2.6x-8.8x)


@dataclass(frozen=True)
class HttpLimits:
    """Every bound of the HTTP server; see the module docstring for what each means."""

    max_connections: int = 64
    request_timeout_s: float = 30.0
    idle_timeout_s: float = 10.0
    max_json_bytes: int = 4 * MiB
    max_binary_bytes: int = 64 * MiB
    max_inflight_bytes: int = 256 * MiB

    def __post_init__(self) -> None:
        for name in ("max_connections", "request_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"http {name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.max_json_bytes <= self.max_binary_bytes:
            raise ValueError(
                f"http max_json_bytes ({self.max_json_bytes}) must be > 0 and "
                f"<= max_binary_bytes ({self.max_binary_bytes})"
            )
        if self.max_json_bytes * JSON_COST > self.max_inflight_bytes:
            raise ValueError(
                f"http max_inflight_bytes must hold one JSON body's parse ({JSON_COST} x "
                f"max_json_bytes = {self.max_json_bytes * JSON_COST} bytes)"
            )
        if self.max_inflight_bytes < self.max_binary_bytes:
            raise ValueError(
                f"http max_inflight_bytes ({self.max_inflight_bytes}) must be >= "
                f"max_binary_bytes ({self.max_binary_bytes})"
            )


class ByteBudget:
    """Bytes held at once by the requests in flight (bodies and JSON answers), over all
    connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # guards _used
        self._used = 0

    def take(self, count: int) -> bool:
        """Take ``count`` bytes if they fit; never waits."""
        with self._lock:
            if self._used + count > self.limit:
                return False
            self._used += count
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self._used -= count

    @property
    def used(self) -> int:
        with self._lock:
            return self._used
