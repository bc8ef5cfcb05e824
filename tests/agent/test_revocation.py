"""Rotating and revoking signing keys with a real agent on a real mosquitto.

The device pins only the fleet's root key. Signing keys are root-certified
(``generate_signing_key``, what ``slimfleet keys generate --root-key`` does) and revoked
with ``revoke`` (what ``slimfleet keys revoke`` does: a root-signed list, retained on
``<prefix>/keys/revoked``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import models
import numpy as np
import pytest
import yaml

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import REVOCATIONS_FILE, Agent
from slimfleet.agent.keyring import KeyRing, issue_revocations, revocation_topic
from slimfleet.agent.link import Backoff
from slimfleet.agent.signing import load_private_key
from slimfleet.agent.update import Timing
from slimfleet.host.fleet.keys import generate_keys, generate_signing_key, revoke

FAST = Timing(5.0, 5.0, Backoff(0.3, 1.0), Backoff(0.1, 0.5))  # short timeouts and retries
X = np.arange(4, dtype=np.float32).reshape(1, 4)


def main(version: int) -> dict:
    return {"main": [{"name": "m", "version": version}]}


def served_const(agent) -> float:
    return float((agent.infer({"x": X})["y"] - X)[0, 0])


class Keys:
    """An offline root and root-certified signing keys, each a fleet config of the rig."""

    def __init__(self, rig, folder: Path) -> None:
        self.rig = rig
        self.folder = folder
        folder.mkdir()
        self.root = folder / "root.key"
        generate_keys(self.root, folder / "root.pub", "root key")

    def signing(self, name: str):
        """A new certified signing key; the rig's fleet now signs with it. Its key id."""
        f = self.folder
        cert = generate_signing_key(
            f / f"{name}.key", f / f"{name}.pub", f / f"{name}.cert", self.root, lifetime_s=3600
        )
        self.rig.fleet = replace(
            self.rig.fleet,
            private_key=f / f"{name}.key",
            public_key=f / f"{name}.pub",
            certificate=f / f"{name}.cert",
            root_key=f / "root.pub",
            revocations=f / "host-revoked.json",
        )
        return cert.key_id

    def agent_config(self, broker_url: str):
        """agent.yaml pinning the root only (no signing key)."""
        path = self.rig.write_agent_yaml(broker_url, keys={"root": str(self.folder / "root.pub")})
        doc = yaml.safe_load(path.read_text())
        del doc["public_keys"]
        path.write_text(yaml.safe_dump(doc))
        return load_agent_config(path)


@pytest.fixture
def keys(rig, tmp_path) -> Keys:
    return Keys(rig, tmp_path / "fleet-keys")


def start(config) -> Agent:
    agent = Agent(config, timing=FAST)
    agent.start()
    return agent


def test_rotation_then_revocation_falls_back_and_stays_off_after_restart(
    mosquitto, rig, watcher, keys
):
    first = keys.signing("first")
    config = keys.agent_config(mosquitto.url)
    rig.publish(models.add_const(1.0), 1)
    agent = start(config)
    try:
        rig.assign(1)
        watcher.event("swap_ok", deployment=main(1))
        # Rotation: a new root-certified key signs m@2 and its desired state; agent.yaml
        # and the running agent are unchanged.
        second = keys.signing("second")
        rig.publish(models.add_const(2.0), 2)
        rig.assign(2)
        watcher.event("swap_ok", deployment=main(2))
        assert served_const(agent) == 2.0

        revoked = revoke(rig.fleet, second, keys.root)
        assert revoked.revoked == [second]
        event = watcher.event("key_revoked", key_id=second)
        assert event["model"] == {"name": "m", "version": 2} and event["fallback"] == main(1)
        assert served_const(agent) == 1.0
        state = watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "revoked")
        assert state["desired"]["outcome"] == "refused" and state["deployment"] == main(1)
        assert state["serving_revoked"] == []
        assert agent.verifier.is_revoked(second) and not agent.verifier.is_revoked(first)
    finally:
        agent.stop()
    # Restarted: the saved list keeps m@2 off before the broker is even reached.
    again = Agent(config, timing=FAST)
    assert again.verifier.is_revoked(second)
    again.start()
    try:
        assert served_const(again) == 1.0
        # The retained desired state signed by the revoked key is refused, not followed.
        refused = watcher.event("desired_refused", stage="verify")
        assert f"revoked key {second}" in refused["reason"]
        keys.signing("third")
        rig.publish(models.add_const(3.0), 3)
        rig.assign(3)
        watcher.event("swap_ok", deployment=main(3))
        assert served_const(again) == 3.0
    finally:
        again.stop()


def test_a_revocation_applied_while_down_takes_effect_at_start(mosquitto, rig, watcher, keys):
    keys.signing("first")
    config = keys.agent_config(mosquitto.url)
    rig.publish(models.add_const(1.0), 1)
    agent = start(config)
    try:
        rig.assign(1)
        watcher.event("swap_ok", deployment=main(1))
        second = keys.signing("second")
        rig.publish(models.add_const(2.0), 2)
        rig.assign(2)
        watcher.event("swap_ok", deployment=main(2))
    finally:
        agent.stop()
    # While the device is down its saved list learns of the revocation (KeyRing API).
    root = load_private_key(keys.root)
    ring = KeyRing([root.public_key()], revocations_path=config.store_dir / REVOCATIONS_FILE)
    assert ring.apply_revocations(issue_revocations(root, 1, [second], time.time())) == {second}
    again = start(config)
    try:
        assert served_const(again) == 1.0  # m@2 (last good) is never served again
        event = watcher.event("key_revoked", key_id=second, stage="start")
        assert event["deployment"] == main(2)
        assert again.state.current == again.state.last_good
        assert again.state.current["main"].primary.version == 1
    finally:
        again.stop()


def test_with_no_deployment_left_to_fall_back_to_it_keeps_serving_and_says_so(
    mosquitto, rig, watcher, keys
):
    only = keys.signing("only")
    config = keys.agent_config(mosquitto.url)
    rig.publish(models.add_const(2.0), 2)
    agent = start(config)
    try:
        rig.assign(2)
        watcher.event("swap_ok", deployment=main(2))
        revoke(rig.fleet, only, keys.root)
        event = watcher.event("key_revoked", key_id=only)
        assert event["fallback"] is None and "still serving it" in event["reason"]
        state = watcher.wait("state", lambda s: s["serving_revoked"])
        assert state["serving_revoked"] == [
            {"slot": "main", "name": "m", "version": 2, "key_id": only}
        ]
        assert state["deployment"] == main(2) and state["desired"]["stage"] == "revoked"
        assert served_const(agent) == 2.0
        # A model signed by a valid key replaces it, and the warning goes.
        keys.signing("next")
        rig.publish(models.add_const(3.0), 3)
        rig.assign(3)
        watcher.event("swap_ok", deployment=main(3))
        watcher.wait("state", lambda s: s["deployment"] == main(3) and not s["serving_revoked"])
    finally:
        agent.stop()


def test_a_revocation_list_not_signed_by_the_root_is_refused(
    mosquitto, rig, watcher, keys, publisher
):
    signing = keys.signing("first")
    config = keys.agent_config(mosquitto.url)
    rig.publish(models.add_const(1.0), 1)
    agent = start(config)
    try:
        rig.assign(1)
        watcher.event("swap_ok", deployment=main(1))
        forged = issue_revocations(load_private_key(keys.folder / "first.key"), 5, [signing], 0)
        publisher.put(revocation_topic(rig.fleet.prefix), forged)
        event = watcher.event("desired_refused", stage="revocation")
        assert "revocation" in event["reason"]
        assert not agent.verifier.is_revoked(signing) and served_const(agent) == 1.0
    finally:
        agent.stop()
