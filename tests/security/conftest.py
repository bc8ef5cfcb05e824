"""The security regression suite: one test per attack, each on a real mosquitto.

What runs here
    Every test starts from a fleet.yaml with identities (two devices, a host and a
    monitor), the CA and client certificates 'slimfleet certs' makes, and the ACL,
    password files and mosquitto.conf 'slimfleet acl' writes (see tests/securefleet.py).
    mosquitto runs exactly those files: mutual TLS on the device listener (client id
    forced to the certificate's name), password plus certificate on the host listener.

How a test reads
    The attacker is a real MQTT client holding one identity's credentials (or none).
    Each test does the attack, then checks the effect did not happen, next to a
    positive control showing the same action works for the identity allowed to do it
    (so a test cannot pass because nothing works at all).

Attacks covered so far (issue 8; other engineers add theirs at merge)
    test_identity.py     anonymous client, client id takeover, reading another device's
                         desired state, spoofing another device's state, a device
                         publishing a desired state, a monitor publishing
    test_agent_identity.py  a real agent over mutual TLS reports as itself; one holding
                         another device's certificate cannot report as the device it claims
    test_tampering.py    a tampered retained chunk: 'slimfleet verify' finds it,
                         'slimfleet publish --repair' fixes it; a tampered manifest is
                         found and re-signed; published models survive a broker restart

Adding an attack
    Use the module-scoped ``secure`` fixture (its broker is shared by the module: give
    your topics their own model name) or build a SecureFleet of your own; connect as an
    identity with ``securefleet.connect(secure.settings(user), client_id)``. The same
    roles on the embedded broker are tested in tests/host/fleet/test_broker_roles.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import models
import pytest
from securefleet import SecureFleet, at, load_agent_rig

PREFIX = "slimfleet-sec"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    """A fleet with identities on mosquitto over mutual TLS, one per test module."""
    fleet = SecureFleet(Path(tmp_path_factory.mktemp("secure")), PREFIX)
    fleet.broker.start()
    yield fleet
    fleet.broker.stop()


_rig = load_agent_rig()
Rig, Watcher, Publisher = _rig.Rig, _rig.Watcher, _rig.Publisher
make_rig, rig, watcher_for, watcher = _rig.make_rig, _rig.rig, _rig.watcher_for, _rig.watcher
publisher_for, publisher, model_files = _rig.publisher_for, _rig.publisher, _rig.model_files


def serve_m1(rig, watcher, url: str):  # type: ignore[no-untyped-def]
    """Publish m@1 (add 1.0), start a real agent (HTTP on a free port), deploy m@1 at
    seq 1 and wait until it serves; the started agent."""
    rig.publish(models.add_const(1.0), 1)
    running = rig.agent(url)
    running.start()
    try:
        rig.assign(1)
        watcher.wait("state", at(1, "serving"))
    except BaseException:
        running.stop()
        raise
    return running


@pytest.fixture
def agent(mosquitto, rig, watcher):  # type: ignore[no-untyped-def]
    """A real agent serving m@1 (add 1.0) at seq 1 on the session's mosquitto."""
    running = serve_m1(rig, watcher, mosquitto.url)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def module_agent(mosquitto, tmp_path_factory, request):  # type: ignore[no-untyped-def]
    """``(rig, watcher, agent)``: one real agent serving m@1 (add 1.0) for a whole module
    (the fuzzes, whose examples are too many for an agent each), its topics the module's."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    rig = Rig(mosquitto.url, f"slimfleet-test/{name}", tmp_path_factory.mktemp(name))
    watcher = Watcher(mosquitto.url, rig.topics, rig.device, f"watch-{name}")
    try:
        running = serve_m1(rig, watcher, mosquitto.url)
        yield rig, watcher, running
        running.stop()
    finally:
        watcher.close()
        rig.close()
