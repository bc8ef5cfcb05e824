"""Helpers for the agent's MQTT tests: a publisher that waits until the broker has it."""

from __future__ import annotations

import getpass
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import Mosquitto

from slimfleet.agent.mqtt import BrokerSettings, make_client


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """Like the shared fixture, but its retained messages really survive a restart.

    Started as root, mosquitto drops to the ``mosquitto`` user, which cannot write
    into pytest's 0700 tmp dirs: persistence (and the log) silently fail. ``user``
    set to the current user keeps it as is (and does nothing when not root).
    """
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.conf.write_text(broker.conf.read_text() + f"user {getpass.getuser()}\n")
    broker.start()
    yield broker
    broker.stop()


class Publisher:
    """A plain paho client that publishes retained QoS 1 messages and waits for PUBACK."""

    def __init__(self, broker: Mosquitto, client_id: str) -> None:
        self.client = make_client(BrokerSettings("127.0.0.1", broker.port), client_id)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def put(self, topic: str, payload: bytes, retain: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"broker did not acknowledge {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher_for(prefix: str) -> Iterator[Callable[[Mosquitto], Publisher]]:
    """A factory of publishers connected to a given broker, closed after the test."""
    made: list[Publisher] = []

    def make(broker: Mosquitto) -> Publisher:
        made.append(Publisher(broker, f"pub{len(made)}-{prefix}"))
        return made[-1]

    yield make
    for pub in made:
        pub.close()


@pytest.fixture
def publisher(mosquitto: Mosquitto, publisher_for: Callable[[Mosquitto], Publisher]) -> Publisher:
    return publisher_for(mosquitto)
