"""The agent's one MQTT connection: persistent session, Last Will, reconnect loop, inboxes.

Modelled on aiomqtt's reconnection recipe: reconnecting is one readable loop
(:meth:`Link._run`) with exponential backoff and jitter, and paho's callbacks only
turn packets into thread-safe queues (:class:`Subscription`) that the daemon reads.

All socket I/O happens on the link's own thread. Other threads may call
:meth:`Link.publish`, :meth:`Link.subscribe` and :meth:`Subscription.add` at any
time: paho queues the packet and wakes the link thread, which writes it.

Bounds (a hostile publisher on the broker must not exhaust the device's memory):

- **Packets**: over MQTT 5 the CONNECT carries ``Maximum Packet Size`` =
  ``inbox.MAX_PACKET_BYTES`` (2 MiB), so the broker never delivers a bigger message. Over
  3.1.1 a :class:`PacketGuard` reads a bigger PUBLISH in 64 KiB pieces and drops them
  (acknowledging it), so it is never held in memory either.
- **Per subscription**: byte limits and bounded queues, see :mod:`slimfleet.agent.inbox`.
- **Outgoing** QoS 1 messages waiting in paho while offline: :data:`MAX_QUEUED_OUT`.
- Every drop counts in :attr:`Link.dropped`; the first of each reason and then at most
  one a second logs a warning and calls ``on_drop`` (a :class:`Dropped`), which the
  daemon turns into a ``message_dropped`` event.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.inbox import (
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_QUEUED_BYTES,
    DROP_TOO_LARGE,
    MAX_PACKET_BYTES,
    DropLog,
    Dropped,
    Message,
    Subscription,
)
from slimfleet.agent.mqtt import BrokerSettings, make_client
from slimfleet.agent.packetguard import PacketGuard

log = logging.getLogger(__name__)

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
# How long an MQTT 5 broker keeps the session (subscriptions, queued QoS 1) offline.
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
# Bound on QoS 1 messages paho keeps while the broker is unreachable.
MAX_QUEUED_OUT = 1000


class LinkError(SlimfleetError):
    """The MQTT link failed: the broker is unreachable, refused us, or the link is closed."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": half the ceiling plus a random half."""

    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 10.0  # a connection that lived this long resets the backoff

    def delay(self, attempt: int) -> float:
        # The exponent is capped: 2.0**1024 overflows a float, and 2**30 exceeds any max_s.
        ceiling = min(self.max_s, self.initial_s * 2 ** min(attempt, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class Link:
    """One MQTT connection for one device, kept alive until :meth:`stop`.

    ``status_topic`` carries ``online`` (retained, on every connect) and ``offline``
    (retained Last Will, and on a clean stop). ``on_drop`` is called on the link thread
    with a :class:`Dropped` for every message a subscription refused (it must not block;
    its exceptions are logged and ignored). The session is persistent: client id =
    ``client_id``, clean_session False (3.1.1) or clean_start False with a session
    expiry (5), so the broker keeps subscriptions and QoS 1 messages while we are away.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        status_topic: str | None = None,
        backoff: Backoff | None = None,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        connect_timeout_s: float = 10.0,
        on_drop: Callable[[Dropped], None] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.status_topic = status_topic
        self.backoff = backoff or Backoff()
        self.session_expiry_s = session_expiry_s
        self.connect_timeout_s = connect_timeout_s
        self.connects = 0  # successful connections so far
        self.last_error: str | None = None
        self.on_drop = on_drop
        # Guards _filters, _stale, _retained and _unsent.
        self._lock = threading.Lock()
        self._drops = DropLog()
        self._filters: dict[str, set[Subscription]] = {}
        self._stale: set[str] = set()  # filters dropped while offline: unsubscribe on connect
        self._retained: dict[str, bytes] = {}
        self._unsent: set[str] = set()
        """Retained topics whose latest payload paho refused (its outgoing queue was full):
        the link thread publishes them again (:meth:`_resend_unsent`)."""
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._connack: Any = None
        self._session_present = False
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    # -- public API ---------------------------------------------------------------

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped so far, by reason (``too_large``, ``queue_full``)."""
        return self._drops.counts

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._thread is not None:
            raise LinkError("link already started")
        self._thread = threading.Thread(
            target=self._run, name=f"link-{self.client_id}", daemon=True
        )
        self._thread.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline``, disconnect cleanly and end the link thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("link thread did not stop within %.1fs", timeout)

    def subscribe(
        self,
        filters: Iterable[str] = (),
        *,
        max_bytes: int = MAX_PACKET_BYTES,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        resync: bool = False,
    ) -> Subscription:
        """A new :class:`Subscription` to ``filters`` (more can be added later) that drops
        messages over ``max_bytes`` and queues within the bounds described there
        (``resync``: fetch the retained messages again after a drop)."""
        sub = Subscription(
            self,
            max_bytes=max_bytes,
            max_messages=max_messages,
            max_queued_bytes=max_queued_bytes,
            resync=resync,
        )
        sub.add(filters)
        return sub

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Queue one message. QoS 1 messages wait in paho while offline; QoS 0 are
        dropped. Returns False if the message was dropped."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
            return True
        log.debug("dropped message on %s: %s", topic, mqtt.error_string(info.rc))
        return False

    def set_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained document now and again after every reconnect, so the
        broker holds the latest value even if it lost its store (one kept per topic).
        When paho refuses it (its outgoing queue is full: a flood of events), the link
        thread tries again until it is queued: the broker never keeps a stale state."""
        with self._lock:
            self._retained[topic] = payload
            self._unsent.discard(topic)
        if self.connected:
            self._queue_retained(topic, payload)

    def _queue_retained(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` retained; when paho refuses it, or when a newer payload was
        set meanwhile (then this one may reach the broker after it), leave the topic to
        :meth:`_resend_unsent`, which sends the latest."""
        queued = self.publish(topic, payload, retain=True)
        with self._lock:
            if not queued or self._retained.get(topic) != payload:
                self._unsent.add(topic)

    def _resend_unsent(self) -> None:
        """Queue again the latest retained documents paho refused (link thread)."""
        with self._lock:
            pending = {t: self._retained[t] for t in self._unsent}
            self._unsent.clear()
        for topic, payload in pending.items():
            self._queue_retained(topic, payload)

    def _resubscribe(self, sub: Subscription) -> None:
        """Subscribe ``sub``'s filters again: the broker re-sends their retained messages."""
        with self._lock:
            filters = list(sub.filters)
        if filters and self.connected:
            self._client.subscribe([(f, 1) for f in filters])

    # -- the reconnect loop -------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._connect()
                self._connected_now()
                self._pump()
            except LinkError as exc:
                self.last_error = str(exc)
                log.warning("MQTT link to %s: %s", self.settings.url, exc)
            except Exception as exc:  # paho re-raises errors from callbacks: reconnect anyway
                self.last_error = f"unexpected error: {exc!r}"
                log.exception("MQTT link to %s failed unexpectedly", self.settings.url)
            finally:
                self._connected.clear()
            if self._stop.is_set():
                break
            if time.monotonic() - started >= self.backoff.stable_s:
                attempt = 0
            delay = self.backoff.delay(attempt)
            attempt += 1
            log.info("reconnecting to %s in %.1fs", self.settings.url, delay)
            self._stop.wait(delay)
        self._shutdown()

    def _connect(self) -> None:
        """Open the socket, send CONNECT and wait for a successful CONNACK."""
        self._connack = None
        kwargs: dict[str, Any] = {}
        if self.settings.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            # The broker must not send us anything bigger: a hostile 100 MB message is
            # discarded by the broker instead of being read into this process.
            props.MaximumPacketSize = MAX_PACKET_BYTES
            kwargs = {"clean_start": False, "properties": props}
        try:
            self._client.connect(
                self.settings.host, self.settings.port, self.settings.keepalive, **kwargs
            )
            # Small packets (PUBACK, SUBSCRIBE) must not wait for Nagle's algorithm:
            # the download asks for each chunk and would stall on delayed ACKs.
            self._client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise LinkError(f"cannot connect: {exc}") from None
        deadline = time.monotonic() + self.connect_timeout_s
        while self._connack is None:
            if self._stop.is_set() or time.monotonic() > deadline:
                self._client.disconnect()
                raise LinkError("no CONNACK from the broker")
            self._loop_once()
        if self._connack.is_failure:
            self._client.disconnect()
            raise LinkError(f"broker refused the connection: {self._connack}")

    def _pump(self) -> None:
        """Run the network loop until the connection drops or stop() is called."""
        while not self._stop.is_set():
            self._loop_once()
            if self._unsent:  # read without the lock: a miss is caught on the next turn
                self._resend_unsent()

    def _loop_once(self) -> None:
        try:
            rc = self._client.loop(timeout=0.25)
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"connection lost: {exc}") from None
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"connection lost: {mqtt.error_string(rc)}")

    def _shutdown(self) -> None:
        """On stop: mark the device offline (the Will only fires on unclean loss)."""
        if self._client.is_connected() and self.status_topic:
            info = self._client.publish(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            # a full outgoing queue (a flood kept the link busy) refuses it: is_published()
            # would raise; the Will then marks the device offline instead
            queued = info.rc == mqtt.MQTT_ERR_SUCCESS
            while queued and not info.is_published() and time.monotonic() < deadline:
                try:
                    self._loop_once()
                except LinkError:
                    break
        try:
            self._client.disconnect()
            self._client.loop(timeout=0.1)
        except (OSError, ssl.SSLError):
            pass
        self._connected.clear()

    # -- paho glue ----------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = make_client(self.settings, self.client_id, persistent=True)
        client.max_queued_messages_set(MAX_QUEUED_OUT)
        if self.settings.protocol == "3.1.1":  # MQTT 5 asks the broker instead (_connect)
            PacketGuard(client, MAX_PACKET_BYTES, self._dropped_unread)
        if self.status_topic:
            client.will_set(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        # Registering an (empty) write hook stops paho from writing to the socket on
        # the caller's thread when another thread publishes: packets are queued and
        # the link thread, woken by paho's socket pair, writes them.
        client.on_socket_register_write = _ignore
        client.on_socket_unregister_write = _ignore
        return client

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._connack = reason
        self._session_present = bool(flags.session_present)

    def _connected_now(self) -> None:
        """Subscribe and publish what every (re)connection needs.

        Runs after paho has handled the CONNACK, so anything paho re-sends from before
        the outage goes out first and the fresh retained documents land last.
        """
        self.connects += 1
        self.last_error = None
        log.info("connected to %s (session present: %s)", self.settings.url, self._session_present)
        # Set before the snapshot: a filter or document added from now on is sent by
        # its caller, one added before is in the snapshot (at worst both: harmless).
        self._connected.set()
        with self._lock:
            filters = list(self._filters)
            stale = list(self._stale - self._filters.keys())
            self._stale.clear()
            retained = dict(self._retained)
        if stale:
            self._client.unsubscribe(stale)
        if filters:
            self._client.subscribe([(f, 1) for f in filters])
        if self.status_topic:
            self._client.publish(self.status_topic, STATUS_ONLINE, qos=1, retain=True)
        for topic, payload in retained.items():
            self._queue_retained(topic, payload)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("ignored a message whose topic is not UTF-8")
            return
        with self._lock:
            targets = {
                sub
                for flt, subs in self._filters.items()
                if mqtt.topic_matches_sub(flt, topic)
                for sub in subs
            }
        if not targets:
            return
        size = len(msg.payload)
        if size > max(sub.max_bytes for sub in targets):  # too large for all: never copied
            for sub in targets:
                self._dropped(Dropped(topic, size, sub.max_bytes, DROP_TOO_LARGE))
            return
        message = Message(topic, bytes(msg.payload), bool(msg.retain))
        for sub in targets:
            dropped = sub._offer(message)
            if dropped is not None:
                self._dropped(dropped)

    def _dropped_unread(self, topic: str, size: int) -> None:
        self._dropped(Dropped(topic, size, MAX_PACKET_BYTES, DROP_TOO_LARGE))

    def _dropped(self, dropped: Dropped) -> None:
        report = self._drops.record(dropped)
        if report is None:
            return
        log.warning(
            "dropped a %d-byte message on %s: %s (limit %d)%s",
            report.size,
            report.topic,
            report.reason.replace("_", " "),
            report.limit,
            f"; {report.suppressed} more dropped since the last report"
            if report.suppressed
            else "",
        )
        if self.on_drop is not None:
            try:
                self.on_drop(report)
            except Exception:
                log.exception("the on_drop callback failed")

    # -- subscription bookkeeping -------------------------------------------------

    def _add(self, sub: Subscription, filters: list[str]) -> None:
        if not filters:
            return
        with self._lock:
            for flt in filters:
                self._filters.setdefault(flt, set()).add(sub)
                sub.filters.add(flt)
        if self.connected:  # else _on_connect subscribes everything
            self._client.subscribe([(f, 1) for f in filters])

    def _remove(self, sub: Subscription, filters: list[str]) -> None:
        gone = []
        with self._lock:
            for flt in filters:
                sub.filters.discard(flt)
                subs = self._filters.get(flt)
                if subs is None:
                    continue
                subs.discard(sub)
                if not subs:
                    del self._filters[flt]
                    gone.append(flt)
        if gone and (
            not self.connected or self._client.unsubscribe(gone)[0] != mqtt.MQTT_ERR_SUCCESS
        ):
            with self._lock:
                self._stale.update(gone)


def _ignore(*_args: object) -> None:
    """A paho socket hook that does nothing (see :meth:`Link._make_client`)."""
