"""Attacks by clients holding the wrong credentials, or none, against mosquitto running
the generated ACL over mutual TLS."""

from __future__ import annotations

import time
from collections.abc import Callable

from securefleet import Probe, SecureFleet, connect

from slimfleet.agent.wire import Topics
from slimfleet.host.fleet.mqttio import BrokerLink

TOPICS = Topics("slimfleet-sec")


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def as_user(secure: SecureFleet, user: str | None, client_id: str | None = None) -> Probe:
    return connect(secure.settings(user), client_id or f"{user}-probe")


def host_publish(secure: SecureFleet, messages: list[tuple[str, bytes]]) -> None:
    with BrokerLink(secure.fleet.broker) as link:
        link.publish_all(messages)


def test_anonymous_client_is_refused(secure: SecureFleet) -> None:
    no_cert = as_user(secure, None)
    assert not no_cert.accepted and no_cert.dropped.is_set()
    # the host listener wants a password as well as a certificate
    cert_only = connect(secure.settings("monitor", host_listener=True), "monitor-probe")
    assert not cert_only.accepted
    control = as_user(secure, "monitor")
    assert control.accepted
    control.close()


def test_device_cannot_take_over_another_devices_client_id(secure: SecureFleet) -> None:
    victim = connect(secure.settings("cam-02"), "cam-02", persistent=True)
    assert victim.accepted
    attacker = connect(secure.settings("cam-01"), "cam-02", persistent=True)
    try:
        assert attacker.accepted  # but the broker gave it its own id, not cam-02's
        host_publish(secure, [(TOPICS.device("cam-02", "desired"), b"for cam-02 only")])
        victim.read(TOPICS.device("cam-02", "desired"), wait=0)
        assert wait_for(lambda: TOPICS.device("cam-02", "desired") in victim.messages)
        assert not victim.dropped.is_set(), "the victim's session was taken over"
        assert attacker.read(TOPICS.device("cam-02", "desired"), wait=0.5) == {}
    finally:
        attacker.close()
        victim.close()


def test_device_cannot_read_another_devices_desired_state(secure: SecureFleet) -> None:
    host_publish(
        secure,
        [(TOPICS.device("cam-02", "desired"), b"B"), (TOPICS.device("cam-01", "desired"), b"A")],
    )
    attacker = as_user(secure, "cam-01")
    try:
        attacker.read(TOPICS.all_devices("desired"), wait=0)
        attacker.read(TOPICS.device("cam-02", "desired"), wait=0)
        attacker.read(f"{TOPICS.prefix}/#", wait=0)
        assert wait_for(lambda: TOPICS.device("cam-01", "desired") in attacker.messages)
        time.sleep(0.5)
        assert TOPICS.device("cam-02", "desired") not in attacker.messages
    finally:
        attacker.close()


def test_device_cannot_spoof_another_devices_state(secure: SecureFleet) -> None:
    attacker = as_user(secure, "cam-01")
    attacker.publish(TOPICS.device("cam-02", "state"), b'{"spoofed": true}')
    attacker.publish(TOPICS.device("cam-02", "status"), b"online")
    attacker.publish(TOPICS.device("cam-01", "state"), b'{"own": true}')  # allowed
    attacker.close()
    monitor = as_user(secure, "monitor")
    try:
        monitor.read(f"{TOPICS.prefix}/devices/+/+", wait=0)
        assert wait_for(lambda: TOPICS.device("cam-01", "state") in monitor.messages)
        time.sleep(0.3)
        assert TOPICS.device("cam-02", "state") not in monitor.messages
        assert TOPICS.device("cam-02", "status") not in monitor.messages
    finally:
        monitor.close()


def test_device_cannot_publish_a_desired_state_or_a_model(secure: SecureFleet) -> None:
    for user in ("cam-01", "monitor"):  # a monitor may not write anything either
        attacker = as_user(secure, user)
        attacker.publish(TOPICS.device("cam-01", "desired"), f"forged by {user}".encode())
        attacker.publish(TOPICS.manifest("evil", 1), b"forged manifest")
        attacker.publish(f"{TOPICS.prefix}/keys/revoked", b"forged revocation")
        attacker.close()
    host_publish(secure, [(f"{TOPICS.prefix}/keys/marker", b"host wrote this")])
    reader = as_user(secure, "monitor")
    try:
        reader.read(f"{TOPICS.prefix}/#", wait=0)
        assert wait_for(lambda: f"{TOPICS.prefix}/keys/marker" in reader.messages)
        time.sleep(0.3)
        forged = [p for p in reader.messages.values() if b"forged" in p]
        assert forged == []
    finally:
        reader.close()
