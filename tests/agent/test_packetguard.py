"""The MQTT 3.1.1 packet guard on a real socket pair: paho reads the bytes, the guard
throws an oversized PUBLISH away and the stream stays in step."""

from __future__ import annotations

import socket

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from slimfleet.agent.packetguard import PacketGuard
from slimfleet.agent.packetguard import _fresh_packet as fresh_packet

LIMIT = 1024


def publish_packet(topic: str, payload: bytes, qos: int = 0, mid: int = 7) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if qos:
        body += mid.to_bytes(2, "big")
    body += payload
    length, remaining = b"", len(body)
    while True:
        byte, remaining = remaining % 128, remaining // 128
        length += bytes([byte | (128 if remaining else 0)])
        if not remaining:
            break
    return bytes([0x30 | (qos << 1)]) + length + body


@pytest.fixture
def rig():
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="g")
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours
    got, drops = [], []
    client.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    PacketGuard(client, LIMIT, lambda topic, size: drops.append((topic, size)))
    yield client, broker, got, drops
    ours.close()
    broker.close()


def pump(client: mqtt.Client, rounds: int = 50) -> None:
    for _ in range(rounds):
        rc = client._packet_read()
        assert rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN), rc


def test_an_oversized_publish_is_dropped_and_the_next_one_delivered(rig):
    client, broker, got, drops = rig
    broker.sendall(publish_packet("a/big", b"x" * 50_000))
    broker.sendall(publish_packet("a/small", b"ok"))
    pump(client)
    assert drops == [("a/big", 50_000)]
    assert got == [("a/small", b"ok")]


def test_a_qos1_oversized_publish_is_acknowledged(rig):
    client, broker, _, drops = rig
    broker.sendall(publish_packet("a/big", b"x" * 5000, qos=1, mid=513))
    pump(client)
    assert drops == [("a/big", 5000)]
    client._packet_write()
    assert broker.recv(16) == bytes([0x40, 2]) + (513).to_bytes(2, "big")  # PUBACK 513


def test_a_connection_reset_mid_drop_starts_clean(rig):
    client, broker, got, drops = rig
    packet = publish_packet("a/big", b"x" * 50_000)
    broker.sendall(packet[:20_000])
    pump(client)
    assert drops == []  # still throwing bytes away
    client._in_packet = fresh_packet()  # what paho does on reconnect
    broker.sendall(publish_packet("a/small", b"fresh"))
    pump(client)
    assert got == [("a/small", b"fresh")] and drops == []
