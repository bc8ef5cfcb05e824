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

    def signing(self, name: str, lifetime_s: float = 3600):
        """A new certified signing key; the rig's fleet now signs with it. Its key id."""
        f = self.folder
        cert = generate_signing_key(
            f / f"{name}.key",
            f / f"{name}.pub",
            f / f"{name}.cert",
            self.root,
            lifetime_s=lifetime_s,
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


class Device:
    """The rig's device pinning only the root: deploys m@VERSION (adds VERSION) signed by
    a new named key, starts agents on its one store and stops them after the test."""

    def __init__(self, keys: Keys, rig, watcher, broker_url: str) -> None:
        self.keys, self.rig, self.watcher = keys, rig, watcher
        self.config = keys.agent_config(broker_url)
        self.agents: list[Agent] = []

    def start(self) -> Agent:
        self.agents.append(Agent(self.config, timing=FAST))
        self.agents[-1].start()
        return self.agents[-1]

    def deploy(self, version: int, key: str, lifetime_s: float = 3600) -> str:
        """Sign with a new key ``key``, publish and assign m@version, wait for the swap."""
        kid = self.keys.signing(key, lifetime_s)
        self.rig.publish(models.add_const(float(version)), version)
        self.rig.assign(version)
        self.watcher.event("swap_ok", deployment=main(version))
        return kid

    def stop(self) -> None:
        while self.agents:
            self.agents.pop().stop()


@pytest.fixture
def device(mosquitto, rig, watcher, tmp_path):
    made = Device(Keys(rig, tmp_path / "fleet-keys"), rig, watcher, mosquitto.url)
    yield made
    made.stop()


def test_rotation_then_revocation_falls_back_and_stays_off_after_restart(rig, watcher, device):
    agent = device.start()
    first = device.deploy(1, "first")
    # Rotation: a new root-certified key signs m@2 and its desired state; agent.yaml and
    # the running agent are unchanged.
    second = device.deploy(2, "second")
    assert served_const(agent) == 2.0

    revoked = revoke(rig.fleet, second, device.keys.root)
    assert revoked.revoked == [second]
    event = watcher.event("key_revoked", key_id=second)
    assert event["model"] == {"name": "m", "version": 2} and event["fallback"] == main(1)
    assert served_const(agent) == 1.0
    state = watcher.wait("state", lambda s: (s["desired"] or {}).get("stage") == "revoked")
    assert state["desired"]["outcome"] == "refused" and state["deployment"] == main(1)
    assert state["serving_revoked"] == []
    assert agent.verifier.is_revoked(second) and not agent.verifier.is_revoked(first)
    device.stop()
    # Restarted: the saved list keeps m@2 off before the broker is even reached.
    again = device.start()
    assert again.verifier.is_revoked(second)
    assert served_const(again) == 1.0
    # The retained desired state signed by the revoked key is refused, not followed.
    refused = watcher.event("desired_refused", stage="verify")
    assert f"revoked key {second}" in refused["reason"]
    device.deploy(3, "third")
    assert served_const(again) == 3.0


def test_a_revocation_applied_while_down_takes_effect_at_start(watcher, device):
    device.start()
    device.deploy(1, "first")
    second = device.deploy(2, "second")
    device.stop()
    # While the device is down its saved list learns of the revocation (KeyRing API).
    root = load_private_key(device.keys.root)
    saved = device.config.store_dir / REVOCATIONS_FILE
    ring = KeyRing([root.public_key()], revocations_path=saved)
    assert ring.apply_revocations(issue_revocations(root, 1, [second], time.time())) == {second}
    again = device.start()
    assert served_const(again) == 1.0  # m@2 (last good) is never served again
    event = watcher.event("key_revoked", key_id=second, stage="start")
    assert event["deployment"] == main(2)
    assert again.state.current == again.state.last_good
    assert again.state.current["main"].primary.version == 1


def test_with_no_deployment_left_to_fall_back_to_it_keeps_serving_and_says_so(rig, watcher, device):
    agent = device.start()
    only = device.deploy(2, "only")
    revoke(rig.fleet, only, device.keys.root)
    event = watcher.event("key_revoked", key_id=only)
    assert event["fallback"] is None and "still serving it" in event["reason"]
    state = watcher.wait("state", lambda s: s["serving_revoked"])
    assert state["serving_revoked"] == [{"slot": "main", "name": "m", "version": 2, "key_id": only}]
    assert state["deployment"] == main(2) and state["desired"]["stage"] == "revoked"
    assert served_const(agent) == 2.0
    # A model signed by a valid key replaces it, and the warning goes.
    device.deploy(3, "next")
    watcher.wait("state", lambda s: s["deployment"] == main(3) and not s["serving_revoked"])


def test_a_revocation_list_not_signed_by_the_root_is_refused(rig, watcher, device, publisher):
    agent = device.start()
    signing = device.deploy(1, "first")
    forged = issue_revocations(load_private_key(device.keys.folder / "first.key"), 5, [signing], 0)
    publisher.put(revocation_topic(rig.fleet.prefix), forged)
    event = watcher.event("desired_refused", stage="revocation")
    assert "revocation" in event["reason"]
    assert not agent.verifier.is_revoked(signing) and served_const(agent) == 1.0


def test_a_model_installed_under_a_certificate_that_since_expired_is_still_served(device):
    device.start()
    device.deploy(1, "short", lifetime_s=2.0)
    time.sleep(2.5)  # the certificate expires: new documents under it are refused
    device.stop()
    again = device.start()  # the stored manifest is re-checked with allow_expired
    assert served_const(again) == 1.0
    assert again.state.current["main"].primary.version == 1
