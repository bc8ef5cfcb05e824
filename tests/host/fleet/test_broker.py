"""The embedded amqtt broker, end to end: publish a model through it, reassemble it."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import models
import pytest
from brokers import free_port

from slimfleet.agent.deployment import DesiredState
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.wire import Manifest, ModelRef
from slimfleet.host.fleet.broker import EmbeddedBroker
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.deploy import assign_main
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.publish import publish_model

Fetch = Callable[[FleetConfig, str, int], tuple[Manifest, bytes, dict[str, Any]]]
ReadDesired = Callable[..., dict[str, DesiredState]]


@pytest.fixture
def embedded_fleet(
    embedded: EmbeddedBroker, make_fleet: Callable[[str], FleetConfig]
) -> FleetConfig:
    return make_fleet(embedded.url)


def test_publish_and_assign_through_the_embedded_broker(
    embedded_fleet: FleetConfig, fetch: Fetch, desired: ReadDesired, tmp_path: Path
) -> None:
    fleet = embedded_fleet
    path = models.save(models.conv_bn_net(), tmp_path / "net.onnx")
    result = publish_model(fleet, path, "net", 1, chunk_size=2048)
    assert result.published and result.chunks > 5
    # a subscriber that arrives afterwards gets everything from the retained store
    assert fetch(fleet, "net", 1)[1] == path.read_bytes()

    # idempotency needs the retained read to work on amqtt too
    assert not publish_model(fleet, path, "net", 1, chunk_size=2048).published
    other = models.save(models.add_one(), tmp_path / "other.onnx")
    with pytest.raises(InputError, match="already published with different content"):
        publish_model(fleet, other, "net", 1)

    canary = fleet.groups["canary"]
    sent = assign_main(fleet, ModelRef("net", 1), canary)
    assert desired(fleet, canary) == {d.device: d for d in sent}


def test_busy_port_is_a_clean_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SlimfleetError, match=f"cannot start the embedded broker on .*:{port}"):
            EmbeddedBroker("127.0.0.1", port).start()


def test_stop_closes_the_port_and_forgets_retained_messages(
    make_fleet: Callable[[str], FleetConfig], prefix: str
) -> None:
    port = free_port()
    broker = EmbeddedBroker("127.0.0.1", port).start()
    fleet = make_fleet(broker.url)
    with BrokerLink(fleet.broker) as link:
        link.publish_all([(f"{prefix}/r", os.urandom(10))])
    broker.stop()
    with pytest.raises(SlimfleetError, match="cannot reach the MQTT broker"):
        BrokerLink(fleet.broker, timeout=2).connect()
    with EmbeddedBroker("127.0.0.1", port), BrokerLink(fleet.broker) as link:
        assert link.read_retained([f"{prefix}/r"]) == {}


def test_a_new_client_gets_retained_messages_of_its_own_subscriptions_only(
    embedded: EmbeddedBroker, collect: Callable[..., dict[str, Any]], prefix: str
) -> None:
    """amqtt 0.12.1 alone would also send what matches anyone's earlier subscriptions."""
    with BrokerLink(BrokerSettings.from_url(embedded.url)) as link:
        link.publish_all([(f"{prefix}/c/0", b"0"), (f"{prefix}/c/1", b"1"), (f"{prefix}/m", b"m")])
        assert link.read_retained([f"{prefix}/m"]) == {f"{prefix}/m": b"m"}
    first = collect(embedded.url, f"{prefix}/c/+", 10, timeout=1.0)
    second = collect(embedded.url, f"{prefix}/c/+", 10, timeout=1.0)
    assert sorted(first) == sorted(second) == [f"{prefix}/c/0", f"{prefix}/c/1"]
