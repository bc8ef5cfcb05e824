"""Over MQTT 3.1.1, throw an oversized PUBLISH away while reading it, never holding it.

MQTT 3.1.1 cannot tell the broker our maximum packet size, and paho reads a whole packet
into memory before handing it over: a 100 MiB message costs about 300 MiB at its peak
(paho's receive buffer, the packet, the payload copy). :class:`PacketGuard` wraps one
paho client's packet reader: once a PUBLISH's fixed header says it is longer than
``limit`` bytes, its bytes are read from the socket in :data:`READ_PIECE` pieces and
dropped, keeping only the first :data:`HEAD_BYTES` (topic and packet id). A QoS 1
PUBLISH is then acknowledged, so the broker neither resends it nor keeps one of its
in-flight slots for it, and ``on_drop(topic, payload_size)`` is called.

The guard relies on paho 2.x internals (``_packet_read``, ``_sock_recv``, ``_in_packet``,
``_send_puback``, ``_msgtime_mutex``); without them it stays off with a warning, and the
link still drops such a message after paho has read it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

PUBLISH = 0x30
READ_PIECE = 64 * 1024
HEAD_BYTES = 2 + 65535 + 2  # topic length, the longest topic, packet id
_NEEDS = ("_packet_read", "_sock_recv", "_in_packet", "_send_puback", "_msgtime_mutex")


def _fresh_packet() -> dict[str, Any]:
    """paho's empty incoming-packet state (``Client._in_packet`` between packets)."""
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


class _Discarding:
    """One oversized PUBLISH being read and dropped."""

    def __init__(self, command: int, length: int) -> None:
        self.qos = (command >> 1) & 3
        self.length = length
        self.remaining = length
        self.head = bytearray()

    def take(self, data: bytes) -> None:
        self.remaining -= len(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]

    def topic_mid_size(self) -> tuple[str, int | None, int]:
        """The topic, packet id (QoS > 0) and payload size of the dropped PUBLISH."""
        topic_len = int.from_bytes(self.head[:2], "big")
        topic = bytes(self.head[2 : 2 + topic_len]).decode("utf-8", "replace")
        id_len = 2 if self.qos else 0
        mid = int.from_bytes(self.head[2 + topic_len : 4 + topic_len], "big") if id_len else None
        return topic, mid, self.length - 2 - topic_len - id_len


class PacketGuard:
    """Installs itself on ``client``; ``on_drop(topic, payload_size)`` runs on the thread
    that runs paho's loop."""

    def __init__(
        self, client: mqtt.Client, limit: int, on_drop: Callable[[str, int], None]
    ) -> None:
        self.client = client
        self.limit = limit
        self.on_drop = on_drop
        self.active = all(hasattr(client, name) for name in _NEEDS)
        if not self.active:
            log.warning("this paho version hides its packet reader: no early packet limit")
            return
        self._read = client._packet_read
        self._recv = client._sock_recv
        self._discarding: _Discarding | None = None  # only the paho loop thread uses it
        client._packet_read = self._packet_read  # type: ignore[method-assign]
        client._sock_recv = self._guarded_recv  # type: ignore[method-assign]

    def _oversized(self) -> bool:
        """paho has the fixed header of a PUBLISH over the limit, and none of its body."""
        state = self.client._in_packet
        return bool(
            state["have_remaining"]
            and not state["packet"]
            and state["command"] & 0xF0 == PUBLISH
            and state["remaining_length"] > self.limit
        )

    def _guarded_recv(self, bufsize: int) -> bytes:
        if self._discarding is None and self._oversized():
            raise BlockingIOError  # paho stops before the body: "try again later"
        return self._recv(bufsize)

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        if self._discarding is not None and not self._oversized():
            self._discarding = None  # paho reset its packet state: a new connection
        if self._discarding is None:
            if not self._oversized():
                rc = self._read()
                if not self._oversized():
                    return rc
            state = self.client._in_packet
            self._discarding = _Discarding(state["command"], state["remaining_length"])
        return self._discard_some()

    def _discard_some(self) -> mqtt.MQTTErrorCode:
        dropping = self._discarding
        assert dropping is not None
        for _ in range(100):  # like paho: give the loop back now and then
            if dropping.remaining <= 0:
                break
            try:
                data = self._recv(min(READ_PIECE, dropping.remaining))
            except BlockingIOError:
                return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:
                return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
            if not data:
                return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
            dropping.take(data)
            with self.client._msgtime_mutex:  # bytes arrived: the keepalive is satisfied
                self.client._last_bytes_received = mqtt.time_func()
        if dropping.remaining > 0:
            return mqtt.MQTTErrorCode.MQTT_ERR_AGAIN
        self._discarding = None
        self.client._in_packet = _fresh_packet()
        topic, mid, size = dropping.topic_mid_size()
        rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        if dropping.qos == 1 and mid is not None:
            rc = self.client._send_puback(mid)
        self.on_drop(topic, size)
        return rc
