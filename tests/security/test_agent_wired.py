"""Attacks the agent's message limits and key ring answer, on a real agent and mosquitto:
a 100 MB message on its desired-state topic over MQTT 3.1.1 and 5, and a compromised
signing key revoked by the root (TUF's key compromise).
"""

from __future__ import annotations

import time

import models
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securefleet import at, served

from slimfleet.agent.keyring import issue_certificate, issue_revocations, revocation_topic
from slimfleet.agent.signing import Signer, load_private_key
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import build_manifest, publish_manifest

HUGE = 100 * 1024 * 1024


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_100_mb_message_is_dropped(mosquitto, rig, watcher, publisher, protocol):
    rig.publish(models.add_const(1.0), 1)
    rig.publish(models.add_const(2.0), 2)
    agent = rig.agent(mosquitto.url, protocol)
    agent.start()
    try:
        rig.assign(1)
        watcher.wait("state", at(1, "serving"))
        # not retained: the session's broker is shared
        publisher.put(rig.topics.device(rig.device, "desired"), b"{" * HUGE, retain=False)
        if protocol == "3.1.1":  # MQTT 5: the broker itself drops it (the agent's maximum
            dropped = watcher.event("message_dropped", timeout=60)  # packet size)
            assert dropped["size"] >= HUGE and dropped["size"] > dropped["limit"]
            assert dropped["topic"].endswith("/desired")
        assert served(agent) == 1.0
        rig.assign(2)  # the next honest one is followed on the same connection
        watcher.wait("state", at(2, "serving"), timeout=60)
        assert served(agent) == 2.0
        assert watcher.events("desired_refused") == []  # dropped before parsing
    finally:
        agent.stop()


@pytest.fixture
def root(tmp_path):
    """The fleet's offline root key: its private key and the public key file devices pin."""
    generate_keys(tmp_path / "root" / "root.key", tmp_path / "root" / "root.pub")
    return load_private_key(tmp_path / "root" / "root.key"), tmp_path / "root" / "root.pub"


def certified(root_key) -> Signer:
    """A signing key the root certified for a day."""
    key = Ed25519PrivateKey.generate()
    now = time.time()
    return Signer(key, issue_certificate(root_key, key.public_key(), not_before=now - 1,
                                         expires=now + 86400))  # fmt: skip


def test_a_revoked_key_is_refused_and_its_model_left(mosquitto, rig, watcher, publisher, root):
    root_key, root_pub = root
    compromised = certified(root_key)
    rig.publish(models.add_const(1.0), 1)  # the fleet's own pinned key
    for version in (2, 3):
        path = rig.model_file(models.add_const(float(version)), f"m-{version}")
        manifest, chunks = build_manifest(compromised, path, "m", version, chunk_size=16 * 1024)
        publish_manifest(rig.fleet, manifest, chunks, signer=compromised)
    agent = rig.agent(mosquitto.url, keys={"root": str(root_pub)})
    agent.start()
    try:
        rig.assign(1)
        watcher.wait("state", at(1, "serving"))
        rig.assign(2)  # signed by the certified key: followed while it is valid
        watcher.wait("state", at(2, "serving"))
        assert served(agent) == 2.0

        revocations = issue_revocations(root_key, 1, [compromised.key_id], time.time())
        publisher.put(revocation_topic(rig.fleet.prefix), revocations)
        revoked = watcher.event("key_revoked", model={"name": "m", "version": 2})
        assert revoked["key_id"] == compromised.key_id
        state = watcher.wait("state", at(2, "refused"))
        assert state["desired"]["stage"] == "revoked"
        assert state["deployment"] == {"main": [{"name": "m", "version": 1}]}
        assert served(agent) == 1.0  # the last good deployment signed by a valid key

        rig.assign(3)  # another model signed by the revoked key
        refused = watcher.event("desired_refused", seq=3)
        assert "revoked" in refused["reason"], refused
        assert served(agent) == 1.0
        # a forged, older revocation list (here: replayed empty) cannot un-revoke it
        publisher.put(revocation_topic(rig.fleet.prefix), issue_revocations(root_key, 1, [], 0))
        rig.assign(2)
        assert "revoked" in watcher.event("desired_refused", seq=4)["reason"]
        assert served(agent) == 1.0
    finally:
        agent.stop()
