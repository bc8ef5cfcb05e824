"""The link's inboxes: per-subscription byte limits and bounded queues.

A hostile publisher on the broker must not exhaust the device's memory, so:

- every :class:`Subscription` has a byte limit (``max_bytes``, at most and by default
  :data:`MAX_PACKET_BYTES`, 2 MiB); a bigger message is dropped before anything copies or
  decodes its payload. Use :data:`DOCUMENT_LIMIT` (64 KiB) for desired states and key
  documents, :data:`MANIFEST_LIMIT` for manifests and :func:`chunk_limit` for chunks;
- a subscription queues at most ``max_messages`` (default 256) messages and
  ``max(max_queued_bytes, max_bytes)`` payload bytes (default 32 MiB); when full, a new
  message is dropped;
- a subscription to topics that hold retained *state* (``resync=True``: desired states,
  revocation lists) asks the broker for the retained messages again (re-subscribing
  re-sends them) once its queue has drained and :data:`RESYNC_QUIET_S` passed without a
  drop, and in any case every :data:`RESYNC_INTERVAL_S` (the broker may drop messages for
  a slow client too, unseen here): a flood on such a topic can delay a valid document,
  not make the device lose it;
- every drop is a :class:`Dropped` the link counts (:class:`DropLog`) and, at most once a
  second per reason (:data:`DROP_REPORT_INTERVAL_S`), logs and hands to its ``on_drop``:
  a flood of bad messages cannot become a flood of warnings and events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from slimfleet.agent.wire import MAX_PAYLOAD_BYTES

if TYPE_CHECKING:
    from slimfleet.agent.link import Link

log = logging.getLogger(__name__)

# The largest packet the broker may send us (MQTT 5 CONNECT Maximum Packet Size), and the
# default per-subscription limit: every legitimate message fits (wire.MAX_PAYLOAD_BYTES).
MAX_PACKET_BYTES = 2 * 1024 * 1024
# Desired states, revocation lists and other small signed documents.
DOCUMENT_LIMIT = 64 * 1024
# Manifests may embed a smoke-test sample: the host keeps them under wire.MAX_PAYLOAD_BYTES.
MANIFEST_LIMIT = MAX_PAYLOAD_BYTES
# A chunk message is the manifest's chunk_size bytes; the margin is slack, not a header.
CHUNK_MARGIN = 1024
DEFAULT_MAX_MESSAGES = 256
# One download window (16 chunk topics, download.py) of the largest chunks fits.
DEFAULT_MAX_QUEUED_BYTES = 16 * MAX_PACKET_BYTES

RESYNC_QUIET_S = 1.0
"""A state subscription re-fetches its retained messages this long after its last drop."""
RESYNC_INTERVAL_S = 60.0
"""... and at least this often: what the broker dropped for us comes back within it."""
DROP_REPORT_INTERVAL_S = 1.0
DROP_TOO_LARGE = "too_large"
DROP_QUEUE_FULL = "queue_full"


def chunk_limit(chunk_size: int) -> int:
    """The byte limit for a subscription to chunks of ``chunk_size`` bytes."""
    return chunk_size + CHUNK_MARGIN


@dataclass(frozen=True)
class Message:
    """One received MQTT message."""

    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Dropped:
    """A message the link refused: ``reason`` is ``too_large`` (``size`` > ``limit``
    bytes) or ``queue_full`` (the subscription already held ``limit`` messages or bytes)."""

    topic: str
    size: int
    limit: int
    reason: str
    suppressed: int = 0  # drops of this reason not reported since the previous report


class DropLog:
    """Counts drops by reason and decides which to report: the first of each reason, then
    at most one per ``interval_s``; a report carries the number it stood for."""

    def __init__(
        self,
        interval_s: float = DROP_REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        # Guards _counts, _last_report and _suppressed (paho's thread and readers).
        self._lock = threading.Lock()
        self._counts = {DROP_TOO_LARGE: 0, DROP_QUEUE_FULL: 0}
        self._last_report: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def record(self, dropped: Dropped) -> Dropped | None:
        """Count ``dropped``; return it (with ``suppressed``) if it is to be reported."""
        reason, now = dropped.reason, self.clock()
        with self._lock:
            self._counts[reason] += 1
            last = self._last_report.get(reason)
            if last is not None and now - last < self.interval_s:
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return None
            self._last_report[reason] = now
            return replace(dropped, suppressed=self._suppressed.pop(reason, 0))


class Subscription:
    """A set of topic filters and the bounded queue of messages that match them.

    A matching message over ``max_bytes`` is dropped unread. The queue holds at most
    ``max_messages`` messages and ``max(max_queued_bytes, max_bytes)`` payload bytes (so
    one message of the limit always fits); a message that would exceed either is dropped.
    Subscribing again to a filter makes the broker send its retained message again,
    so readers must tolerate duplicates.
    """

    def __init__(
        self,
        link: Link,
        *,
        max_bytes: int = MAX_PACKET_BYTES,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        resync: bool = False,
    ) -> None:
        if not 0 <= max_bytes <= MAX_PACKET_BYTES or max_messages < 1:
            raise ValueError(
                f"max_bytes must be between 0 and {MAX_PACKET_BYTES}, max_messages >= 1"
            )
        self._link = link
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.max_queued_bytes = max(max_queued_bytes, max_bytes)
        self.resync = resync
        # Guards _messages, _queued_bytes, _lost, _last_drop and _last_resync (written by
        # the link thread, read by readers).
        self._ready = threading.Condition()
        self._messages: deque[Message] = deque()
        self._queued_bytes = 0
        self._lost = False
        """A message was dropped for a full queue since the last resync."""
        self._last_drop = self._last_resync = time.monotonic()
        self.filters: set[str] = set()

    def add(self, filters: Iterable[str]) -> None:
        """Subscribe to more filters (QoS 1); their retained messages follow."""
        self._link._add(self, list(filters))

    def remove(self, filters: Iterable[str]) -> None:
        self._link._remove(self, list(filters))

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after ``timeout`` seconds."""
        message = None
        with self._ready:
            if self._ready.wait_for(lambda: self._messages, timeout):
                message = self._messages.popleft()
                self._queued_bytes -= len(message.payload)
            resync = self.resync and not self._messages and self._resync_due()
        if resync:  # the retained state again (outside the lock: the link thread takes it)
            log.debug("re-fetching the retained messages of a state subscription")
            self._link._resubscribe(self)
        return message

    def _resync_due(self) -> bool:
        """Whether to re-fetch the retained messages now (and, if so, note it); the
        caller holds ``_ready``."""
        now = time.monotonic()
        lost = self._lost and now - self._last_drop >= RESYNC_QUIET_S
        if lost or now - self._last_resync >= RESYNC_INTERVAL_S:
            self._lost, self._last_resync = False, now
            return True
        return False

    def close(self) -> None:
        self.remove(list(self.filters))

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _offer(self, message: Message) -> Dropped | None:
        """Queue ``message``, or say why it was dropped (it is over a bound)."""
        size = len(message.payload)
        if size > self.max_bytes:
            return Dropped(message.topic, size, self.max_bytes, DROP_TOO_LARGE)
        with self._ready:
            full = len(self._messages) >= self.max_messages
            if full or self._queued_bytes + size > self.max_queued_bytes:
                self._lost, self._last_drop = True, time.monotonic()
                limit = self.max_messages if full else self.max_queued_bytes
                return Dropped(message.topic, size, limit, DROP_QUEUE_FULL)
            self._messages.append(message)
            self._queued_bytes += size
            self._ready.notify()
        return None
