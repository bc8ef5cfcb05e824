"""The embedded broker with a fleet's identities enforces the same roles as mosquitto."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import free_port
from securefleet import SecureFleet, connect, run_agent

from slimfleet.agent.errors import InputError
from slimfleet.agent.mqtt import BrokerSettings, make_client
from slimfleet.host.fleet.acl import fleet_policy
from slimfleet.host.fleet.broker import EmbeddedBroker, broker_policy
from slimfleet.host.fleet.mqttio import BrokerLink


@pytest.fixture
def roles(tmp_path: Path, prefix: str) -> Iterator[tuple[SecureFleet, BrokerSettings]]:
    """A fleet with identities (passwords only) and the embedded broker enforcing it."""
    secure = SecureFleet(tmp_path, prefix, tls=False)
    with EmbeddedBroker("127.0.0.1", free_port(), fleet_policy(secure.fleet)) as broker:
        yield secure, BrokerSettings("127.0.0.1", broker.port)


def login(secure: SecureFleet, at: BrokerSettings, user: str | None, password: str | None = None):
    own = secure.settings(user)
    return BrokerSettings(
        at.host, at.port, username=own.username, password=password or own.password
    )


def test_anonymous_and_wrong_password_are_refused(roles) -> None:
    secure, at = roles
    for settings in (at, login(secure, at, "cam-01", "wrong")):
        probe = connect(settings, "intruder")
        assert not probe.accepted
        probe.close()
    ok = connect(login(secure, at, "cam-01"), "cam-01")
    assert ok.accepted
    ok.close()


def test_device_reads_only_its_own_desired_state_and_cannot_take_over_an_id(roles) -> None:
    secure, at = roles
    topics = secure.fleet.topics
    with BrokerLink(login(secure, at, "host")) as link:
        link.publish_all([(topics.device("cam-02", "desired"), b"B")])
        link.publish_all([(topics.device("cam-01", "desired"), b"A")])
    victim = connect(login(secure, at, "cam-02"), "cam-02", persistent=True)
    attacker = connect(login(secure, at, "cam-01"), "cam-02", persistent=True)
    try:
        assert victim.accepted and attacker.accepted
        got = attacker.read(topics.device("cam-02", "desired"), wait=0.5)
        assert got == {}
        got = attacker.read(topics.device("cam-01", "desired"), wait=1.0)
        assert got == {topics.device("cam-01", "desired"): b"A"}  # its own id, its own topic
        assert not victim.dropped.is_set(), "the victim's session was taken over"
        assert victim.read(topics.device("cam-02", "desired"), wait=1.0)
    finally:
        attacker.close()
        victim.close()


def test_device_cannot_spoof_state_or_publish_desired_and_monitor_only_reads(roles) -> None:
    secure, at = roles
    topics = secure.fleet.topics
    device = connect(login(secure, at, "cam-01"), "cam-01")
    device.publish(topics.device("cam-02", "state"), b"spoofed")
    device.publish(topics.device("cam-01", "desired"), b"forged")
    device.publish(topics.device("cam-01", "state"), b"own")
    device.close()
    monitor = connect(login(secure, at, "monitor"), "monitor")
    monitor.publish(topics.manifest("evil", 1), b"forged")
    seen = monitor.read(f"{topics.prefix}/#", wait=1.5)
    monitor.close()
    assert seen == {topics.device("cam-01", "state"): b"own"}
    # the host, on the other hand, may publish and read back anything
    with BrokerLink(login(secure, at, "host")) as link:
        link.publish_all([(topics.manifest("good", 1), b"signed elsewhere")])


def test_broker_command_enforces_identities_only_when_the_fleet_has_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fleet_yaml: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert broker_policy(None) is None  # no fleet.yaml here: anonymous, as before
    with pytest.raises(InputError, match="has no 'identities:' section"):
        broker_policy(fleet_yaml)
    secure = SecureFleet(tmp_path / "secure", "p", tls=False)
    policy = broker_policy(secure.path)
    assert policy is not None and set(policy.hashes) == {"cam-01", "cam-02", "host", "monitor"}
    assert policy.bound == {"cam-01", "cam-02", "monitor"}
    password = secure.settings("cam-01").password
    assert policy.admits("cam-01", password) and not policy.admits("cam-02", password)
    assert not policy.admits(None, None)


def test_the_gate_hands_amqtt_the_whole_connect_including_the_last_will(roles) -> None:
    """The gate re-encodes the CONNECT: the will (the agent's "offline" status) survives."""
    secure, at = roles
    status = secure.fleet.topics.device("cam-01", "status")
    monitor = connect(login(secure, at, "monitor"), "monitor")
    monitor.read(status, wait=0.3)
    settings = login(secure, at, "cam-01")
    client = make_client(settings, "anything")
    client.will_set(status, b"offline", qos=1, retain=True)
    client.connect(settings.host, settings.port, 5)
    client.loop_start()
    time.sleep(0.5)
    client.socket().close()  # a crash: no DISCONNECT, so the broker sends the will
    client.loop_stop()
    deadline = time.monotonic() + 15
    while status not in monitor.messages and time.monotonic() < deadline:
        time.sleep(0.1)
    monitor.close()
    assert monitor.messages.get(status) == b"offline"


def test_an_agent_logs_in_with_its_password_file_and_reports(roles, tmp_path: Path) -> None:
    secure, at = roles
    run_agent(secure.agent_yaml(tmp_path / "agent", "cam-01", "cam-01", at.port), 2.0)
    seen = secure.reports_of("cam-01", at, wait=1.0)
    assert secure.fleet.topics.device("cam-01", "state") in seen
    run_agent(secure.agent_yaml(tmp_path / "liar", "cam-02", "cam-01", at.port), 2.0)
    assert secure.reports_of("cam-02", at, wait=1.0) == {}
