"""The host's MQTT plumbing: connect with a timeout, publish and wait, read retained messages.

Host commands are short-lived: one connection, a few reads and writes, then exit. Every
failure becomes a one-line :class:`SlimfleetError` that names the broker URL.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.mqtt import BrokerSettings, make_client

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
# QoS 1 publishes in flight before waiting for the oldest PUBACK (paho allows 20).
PUBLISH_WINDOW = 16

Progress = Callable[[int, int], None]
UNSPECIFIED = 128  # the reason code paho reports when the TCP link just drops


class BrokerLink:
    """One connected paho client; use as a context manager.

    ``timeout`` bounds connecting, each PUBACK and each SUBACK.
    """

    def __init__(
        self, settings: BrokerSettings, *, timeout: float = DEFAULT_TIMEOUT_S, client_id: str = ""
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self.client_id = client_id or f"slimfleet-host-{uuid.uuid4().hex[:12]}"
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._connect_rc: Any = None
        self._lost: str | None = None
        self._acks: dict[int, list[Any]] = {}  # message id -> reason codes of SUBACK/UNSUBACK
        self._wanted: set[str] = set()
        self._retained: dict[str, bytes] = {}

    # -- connection -------------------------------------------------------------
    def __enter__(self) -> BrokerLink:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> None:
        url = self.settings.url
        try:
            client = make_client(self.settings, self.client_id)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise SlimfleetError(f"cannot set up TLS for {url}: {exc}") from None
        client.connect_timeout = self.timeout
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_ack
        client.on_unsubscribe = self._on_ack
        client.on_message = self._on_message
        try:
            client.connect(self.settings.host, self.settings.port, self.settings.keepalive)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise SlimfleetError(f"cannot reach the MQTT broker at {url}: {reason}") from None
        self._client = client
        client.loop_start()
        if not self._connected.wait(self.timeout):
            self.close()
            raise SlimfleetError(f"the MQTT broker at {url} did not accept the connection in time")
        if self._connect_rc.is_failure:
            self.close()
            raise SlimfleetError(
                f"the MQTT broker at {url} refused the connection: {self._connect_rc}"
            )
        log.debug("connected to %s as %s", url, self.client_id)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    @property
    def client(self) -> mqtt.Client:
        if self._client is None:
            raise SlimfleetError(f"not connected to {self.settings.url}")
        return self._client

    # -- paho callbacks (network thread) ----------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connect_rc = reason_code
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._client is not None:
            # MQTT 3.1.1 carries no reason: paho reports "Unspecified error" for a dropped link
            self._lost = "" if reason_code == UNSPECIFIED else f" ({reason_code})"
            client.disconnect()  # no automatic reconnect: a host command fails instead

    def _on_ack(self, client, userdata, mid, reason_codes, properties) -> None:
        self._acks[mid] = reason_codes if isinstance(reason_codes, list) else [reason_codes]

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if message.retain and message.payload and message.topic in self._wanted:
            self._retained[message.topic] = bytes(message.payload)

    # -- operations -------------------------------------------------------------
    def _check(self, rc: int, what: str) -> None:
        if self._lost is not None:
            raise SlimfleetError(
                f"lost the connection to {self.settings.url}{self._lost}: "
                "the broker stopped or refused a packet (too large? not authorized?)"
            )
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise SlimfleetError(f"{what} on {self.settings.url} failed: {mqtt.error_string(rc)}")

    def _request(self, sent: tuple[int, int | None], what: str) -> list[Any]:
        """Wait for the SUBACK/UNSUBACK of a ``(rc, mid)`` from paho; return its codes."""
        rc, mid = sent
        self._check(rc, what)
        if not self._wait(lambda: mid in self._acks):
            raise SlimfleetError(f"{what}: no answer from {self.settings.url} in {self.timeout:g}s")
        return self._acks.pop(mid)  # type: ignore[arg-type]

    def _wait(self, done: Callable[[], bool]) -> bool:
        """Poll ``done`` until it is true, the timeout passes, or the connection drops."""
        deadline = time.monotonic() + self.timeout
        while not done():
            self._check(mqtt.MQTT_ERR_SUCCESS, "")
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1, retain=True)
        self._check(info.rc, f"publishing {topic}")
        return info

    def _wait_published(self, info: mqtt.MQTTMessageInfo, topic: str) -> None:
        if not self._wait(info.is_published):
            raise SlimfleetError(
                f"publishing {topic}: no PUBACK from {self.settings.url} in {self.timeout:g}s"
            )

    def publish_all(
        self,
        messages: Iterable[tuple[str, bytes]],
        *,
        progress: Progress | None = None,
        confirm: bool = True,
    ) -> int:
        """Publish retained QoS 1 messages, a window at a time; return how many were acked.

        ``progress(done, total)`` is called after each PUBACK. With ``confirm``, the last
        message is then read back (see :meth:`confirm_retained`); brokers handle one
        client's messages in order, so that vouches for the ones before it too.
        """
        messages = list(messages)
        pending: deque[tuple[mqtt.MQTTMessageInfo, str]] = deque()
        done = 0

        def settle_oldest() -> None:
            nonlocal done
            info, topic = pending.popleft()
            self._wait_published(info, topic)
            done += 1
            if progress is not None:
                progress(done, len(messages))

        for topic, payload in messages:
            pending.append((self._publish(topic, payload), topic))
            if len(pending) >= PUBLISH_WINDOW:
                settle_oldest()
        while pending:
            settle_oldest()
        if confirm and messages:
            self.confirm_retained(*messages[-1])
        return done

    def confirm_retained(self, topic: str, payload: bytes) -> None:
        """Wait until the broker serves ``payload`` as the retained message of ``topic``.

        A PUBACK alone does not prove it: mosquitto acknowledges what its ACL silently
        discards, a broker may have retained messages disabled, and amqtt acknowledges
        before it stores.
        """
        deadline = time.monotonic() + self.timeout
        while self.read_retained([topic]).get(topic) != payload:
            if time.monotonic() >= deadline:
                raise SlimfleetError(
                    f"{self.settings.url} acknowledged {topic} but does not serve it as a "
                    "retained message (an ACL denying this client? retain disabled?)"
                )
            time.sleep(0.05)

    def read_retained(self, topics: list[str]) -> dict[str, bytes]:
        """The retained payloads of ``topics`` (absent topics are missing from the result).

        Subscribes, then subscribes to a second, unused topic: brokers answer
        subscriptions in order and send retained messages with (mosquitto) or right
        after (amqtt) their SUBACK, so the second SUBACK means every retained message
        for the first has arrived. Then unsubscribes.
        """
        self._wanted = set(topics)
        self._retained = {}
        try:
            codes = self._request(self.client.subscribe([(t, 0) for t in topics]), "subscribing")
            if any(code.is_failure for code in codes):
                raise SlimfleetError(
                    f"{self.settings.url} refused the subscription to {topics[0]}: "
                    "is this client allowed to read the fleet's topics?"
                )
            barrier = f"{topics[0]}/_barrier/{self.client_id}"
            self._request(self.client.subscribe(barrier, 0), "subscribing")
            self._request(self.client.unsubscribe([*topics, barrier]), "unsubscribing")
            return dict(self._retained)
        finally:
            self._wanted = set()
