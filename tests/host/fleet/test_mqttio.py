"""BrokerLink against real brokers: clean one-line failures, never a hang."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import Mosquitto, free_port

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.host.fleet import broker as broker_module
from slimfleet.host.fleet.mqttio import BrokerLink


def settings(url: str) -> BrokerSettings:
    return BrokerSettings.from_url(url)


def test_publish_all_then_read_retained(mosquitto: Mosquitto, prefix: str) -> None:
    messages = [(f"{prefix}/m/{i}", os.urandom(1000 + i)) for i in range(40)]
    seen: list[tuple[int, int]] = []
    with BrokerLink(settings(mosquitto.url)) as link:
        assert link.publish_all(messages, progress=lambda *a: seen.append(a)) == 40
    assert seen == [(i, 40) for i in range(1, 41)]
    with BrokerLink(settings(mosquitto.url)) as link:
        wanted = [t for t, _ in messages[::3]] + [f"{prefix}/absent"]
        got = link.read_retained(wanted)
        assert got == {t: p for t, p in messages[::3]}
        assert link.read_retained([f"{prefix}/absent"]) == {}


def test_unreachable_broker_is_one_line_with_the_url() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(SlimfleetError) as info:
        BrokerLink(settings(url), timeout=2).connect()
    message = str(info.value)
    assert message.startswith(f"cannot reach the MQTT broker at {url}: ") and "\n" not in message


@pytest.mark.timeout(60)  # a hang fails here
def test_silent_server_times_out() -> None:
    with socket.socket() as server:  # accepts TCP, never answers CONNECT
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(SlimfleetError, match="did not accept the connection in time"):
            BrokerLink(settings(url), timeout=1).connect()


# The link's own timeout is far beyond the test's: only noticing the loss passes.
@pytest.mark.timeout(60)
def test_broker_gone_mid_session_fails_fast(own_mosquitto: Mosquitto, prefix: str) -> None:
    link = BrokerLink(settings(own_mosquitto.url), timeout=3600).__enter__()
    try:
        own_mosquitto.stop()
        with pytest.raises(SlimfleetError, match=own_mosquitto.url):
            link.publish_all([(f"{prefix}/x/{i}", b"x" * 1000) for i in range(50)])
    finally:
        link.close()


@pytest.mark.timeout(60)
def test_packet_over_the_broker_limit_fails_fast(strict_mosquitto: Mosquitto, prefix: str) -> None:
    """A broker that drops the client for an oversized packet: an error, not a hang."""
    with (
        BrokerLink(settings(strict_mosquitto.url), timeout=3600) as link,
        pytest.raises(SlimfleetError, match="lost the connection"),
    ):
        link.publish_all([(f"{prefix}/big", os.urandom(3 * 1024 * 1024))])


@pytest.fixture
def acl_mosquitto(tmp_path: Path) -> Iterator[Callable[[str], Mosquitto]]:
    """Start a mosquitto whose anonymous clients get one ACL rule."""
    started: list[Mosquitto] = []

    def start(rule: str) -> Mosquitto:
        acl = tmp_path / "acl"
        acl.write_text(rule + "\n")
        broker = Mosquitto(tmp_path / "acl-mosquitto")
        broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def test_a_publish_the_broker_acknowledges_but_drops_is_an_error(
    acl_mosquitto: Callable[[str], Mosquitto], prefix: str
) -> None:
    """mosquitto PUBACKs (MQTT 3.1.1) a message its ACL forbids, then discards it."""
    broker = acl_mosquitto("topic read #")
    with (
        BrokerLink(settings(broker.url), timeout=2) as link,
        pytest.raises(SlimfleetError, match="does not serve it as a retained message"),
    ):
        link.publish_all([(f"{prefix}/denied", b"x")])


# amqtt 0.12.1's config dataclass rejects the new "subscribe-acl" key; "acl" still works
@pytest.mark.filterwarnings("ignore:The 'acl' option is deprecated:DeprecationWarning")
def test_a_refused_subscription_is_an_error_not_an_empty_answer(
    monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    """Reading nothing would make publish overwrite a version it cannot see. Brokers
    that check ACLs on SUBSCRIBE (amqtt here, EMQX, HiveMQ) say so in the SUBACK;
    mosquitto grants the subscription and delivers nothing, undetectable."""
    plain = broker_module.broker_config

    def with_acl(host: str, port: int) -> dict[str, Any]:
        config = plain(host, port)
        config["plugins"]["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"] = {
            "acl": {"anonymous": ["elsewhere/#"]}
        }
        return config

    monkeypatch.setattr(broker_module, "broker_config", with_acl)
    with (
        broker_module.EmbeddedBroker("127.0.0.1", free_port()) as broker,
        BrokerLink(settings(broker.url), timeout=5) as link,
        pytest.raises(SlimfleetError, match="refused the subscription"),
    ):
        link.read_retained([f"{prefix}/anything"])
