"""TUF attack classes against a real agent on a real mosquitto, the ones tests/agent/ does
not already cover (the index of every attack and its test is the docstring of tests/security/conftest.py).

Each test: the agent serves m@1 (add 1.0); the attacker publishes what any client on a
broker without an ACL could (retained); the test checks the agent refused and reported it,
m@1 still answers, and the next honest desired state is still followed.
"""

from __future__ import annotations

import json

import models
import pytest
from securefleet import at, served

from slimfleet.agent.deployment import MAX_SLOTS, MAX_TIERS
from slimfleet.agent.signing import Signer, load_private_key
from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import build_manifest, publish_manifest, publish_model


@pytest.fixture
def attacker(tmp_path) -> Signer:
    """A valid Ed25519 key the device does not pin."""
    keys = tmp_path / "attacker"
    generate_keys(keys / "evil.key", keys / "evil.pub")
    return Signer(load_private_key(keys / "evil.key"))


def refused(agent, watcher, seq: int, stage: str) -> dict:
    """Desired state ``seq`` was refused at ``stage``, reported, and m@1 still answers."""
    event = watcher.event("desired_refused", seq=seq)
    assert event["stage"] == stage, event
    watcher.wait("state", at(seq, "refused"))
    assert served(agent) == 1.0
    return event


def forgery_refused(agent, watcher) -> dict:
    """An unverifiable desired state was refused at verify (its seq is not trusted, so the
    event carries the one followed), the floor did not move, and m@1 still answers."""
    event = watcher.wait(
        "events", lambda e: e["type"] == "desired_refused" and e["stage"] == "verify"
    )
    assert agent.state.floor == 1 and served(agent) == 1.0
    return event


def follows_the_next_honest_one(agent, rig, watcher, value: float = 3.0) -> None:
    version = int(value)
    rig.publish(models.add_const(value), version)
    rig.assign(version)
    watcher.wait("state", at(rig.seq, "serving"))
    assert served(agent) == value


# -- arbitrary installation -----------------------------------------------------------------


@pytest.mark.parametrize("forgery", ["unsigned", "attacker-key", "attacker-key-claims-fleet-id"])
def test_a_forged_desired_state_is_refused(agent, rig, watcher, attacker, forgery):
    rig.publish(models.add_const(2.0), 2)
    doc = json.loads(rig.desired({"main": "m@2"}))["signed"]  # seq 2
    if forgery == "unsigned":
        envelope = json.dumps({"signed": doc, "signature": ""}).encode()
    elif forgery == "attacker-key":
        envelope = attacker.sign({**doc, "key_id": attacker.key_id})
    else:  # the fleet's key id, the attacker's signature
        forged = json.loads(attacker.sign({**doc, "key_id": attacker.key_id}))
        envelope = json.dumps({**forged, "signed": doc}).encode()
    rig.put_desired(envelope)
    event = forgery_refused(agent, watcher)
    assert "signature" in event["reason"] or "key" in event["reason"], event
    follows_the_next_honest_one(agent, rig, watcher)


def test_a_manifest_signed_by_an_unpinned_key_is_never_installed(agent, rig, watcher, attacker):
    """Pending at verify (the broker's copy may be repaired), never installed, m@1 serves."""
    path = rig.model_file(models.add_const(2.0), "m-2")
    manifest, chunks = build_manifest(attacker, path, "m", 2, chunk_size=16 * 1024)
    publish_manifest(rig.fleet, manifest, chunks, signer=attacker)
    rig.assign(2)
    state = watcher.wait(
        "state", lambda s: at(2)(s) and (s["desired"] or {}).get("stage") == "verify"
    )
    assert state["desired"]["outcome"] == "pending" and "unknown key" in state["desired"]["reason"]
    assert served(agent) == 1.0
    assert watcher.events("download_progress")[-1]["model"] == {"name": "m", "version": 1}


# -- endless data -----------------------------------------------------------------------------


def test_a_chunk_longer_than_declared_is_refused(agent, rig, watcher, publisher):
    path = rig.publish(models.add_const(2.0, pad_bytes=40_000), 2)
    good = path.read_bytes()[: 16 * 1024]
    topic = rig.topics.chunk("m", 2, 0)
    publisher.put(topic, good + b"\0" * 100)  # same prefix, a little longer: hash refused
    rig.assign(2)
    failed = watcher.event("verify_failed", model={"name": "m", "version": 2})
    assert failed["stage"] == "download" and "chunk 0" in failed["reason"]
    publisher.put(topic, good + b"\0" * 1_000_000)  # far longer: dropped before it is read
    dropped = watcher.event("message_dropped", topic=topic)
    assert dropped["size"] > dropped["limit"] >= 16 * 1024 and dropped["reason"] == "too_large"
    assert served(agent) == 1.0 and not agent.store.has(ModelRef("m", 2))
    publisher.put(topic, good)  # the host repairs it
    watcher.wait("state", at(2, "serving"), timeout=30)
    assert served(agent) == 2.0


# -- extraneous dependencies --------------------------------------------------------------------


def test_a_desired_state_naming_an_unpublished_model_keeps_the_old_set(agent, rig, watcher):
    rig.assign(7, name="never-published")  # seq 2: the manifest never arrives
    state = watcher.wait("state", at(2))
    assert state["desired"]["outcome"] in ("pending", "refused")
    assert state["deployment"] == {"main": [{"name": "m", "version": 1}]}
    assert served(agent) == 1.0
    follows_the_next_honest_one(agent, rig, watcher)


@pytest.mark.parametrize("shape", ["slots", "tiers"])
def test_a_deployment_with_too_many_slots_or_tiers_is_refused(agent, rig, watcher, shape):
    doc = json.loads(rig.desired({"main": "m@1"}))["signed"]  # seq 2, correctly signed
    one = doc["deployment"]["main"]
    if shape == "slots":
        doc["deployment"] = {f"s{i}": one for i in range(MAX_SLOTS + 1)}
    else:
        doc["deployment"] = {"main": {**one, "models": one["models"] * (MAX_TIERS + 1)}}
    rig.put_desired(rig.fleet.signer().sign(doc))
    event = forgery_refused(agent, watcher)
    assert str(MAX_SLOTS if shape == "slots" else MAX_TIERS) in event["reason"], event
    follows_the_next_honest_one(agent, rig, watcher)


# -- fast-forward ------------------------------------------------------------------------------


def test_a_huge_signed_seq_is_followed_and_raises_the_floor_for_good(agent, rig, watcher):
    """A valid key can fast-forward the floor (TUF's fast-forward needs the key): the
    device follows it, and every older desired state, replayed or honest, is refused until
    the host's own sequence passes it (the host keeps its sequence retained, signed)."""
    rig.publish(models.add_const(2.0), 2)
    captured = rig.desired({"main": "m@1"}, rollback=True)  # seq 2, captured by the attacker
    huge = 2**53 - 1
    rig.deploy({"main": "m@2"}, seq=huge)
    watcher.wait("state", at(huge, "serving"))
    assert agent.state.floor == huge and served(agent) == 2.0
    rig.put_desired(captured)
    event = watcher.event("desired_refused", seq=2)
    assert event["stage"] == "replay"
    assert agent.state.floor == huge and served(agent) == 2.0


# -- malicious mirror ------------------------------------------------------------------------


def test_a_tampered_and_a_deleted_chunk_are_refused_until_publish_repair(
    agent, rig, watcher, publisher
):
    """The broker's copy is damaged (one chunk swapped, one deleted) after the host
    published; the device refuses and keeps m@1 until 'publish --repair' re-sends them."""
    path = rig.publish(models.add_const(2.0, pad_bytes=60_000), 2)
    publisher.put(rig.topics.chunk("m", 2, 1), b"evil bytes")
    publisher.put(rig.topics.chunk("m", 2, 3), b"")  # a retained message deleted
    rig.assign(2)
    failed = watcher.event("verify_failed", model={"name": "m", "version": 2})
    assert "chunk 1" in failed["reason"] and served(agent) == 1.0
    fixed = publish_model(rig.fleet, path, "m", 2, chunk_size=16 * 1024, repair=True)
    assert fixed.repaired == {"chunks": [1, 3], "manifest": False}
    watcher.wait("state", at(2, "serving"), timeout=30)
    assert served(agent) == 2.0


# -- mix-and-match -----------------------------------------------------------------------------


def test_a_manifest_of_one_version_with_the_chunks_of_another_is_refused(
    agent, rig, watcher, publisher
):
    rig.publish(models.add_const(2.0), 2)
    three = rig.publish(models.add_const(3.0), 3).read_bytes()
    for i in range(0, len(three), 16 * 1024):  # m@3's chunks on m@2's topics
        publisher.put(rig.topics.chunk("m", 2, i // (16 * 1024)), three[i : i + 16 * 1024])
    rig.assign(2)
    failed = watcher.event("verify_failed", model={"name": "m", "version": 2})
    assert failed["stage"] == "download"
    assert served(agent) == 1.0
    state = watcher.wait("state", at(2))
    assert state["deployment"] == {"main": [{"name": "m", "version": 1}]}


def test_a_desired_state_for_another_device_on_this_ones_topic_is_refused(agent, rig, watcher):
    rig.publish(models.add_const(2.0), 2)
    rig.put_desired(rig.desired({"main": "m@2"}, device="cam-other"))  # seq 2, validly signed
    event = forgery_refused(agent, watcher)
    assert "cam-other" in event["reason"], event
    follows_the_next_honest_one(agent, rig, watcher)


# -- wrong software ----------------------------------------------------------------------------


def test_a_model_whose_io_is_not_what_its_manifest_declares_is_refused(agent, rig, watcher):
    """m@2's file takes inputs a and b; its signed manifest claims m@1's x -> y."""
    signer = rig.fleet.signer()
    honest, _ = build_manifest(signer, rig.model_file(models.add_const(2.0), "m-2-io"), "m", 2)
    path = rig.model_file(models.add_const(2.0, size=8), "m-2")  # x [1, 8], not [1, 4]
    manifest, chunks = build_manifest(signer, path, "m", 2)
    manifest.io, manifest.smoke = honest.io, honest.smoke
    publish_manifest(rig.fleet, manifest, chunks, signer=signer)
    rig.assign(2)
    event = watcher.event("desired_refused", seq=2)
    assert event["stage"] in ("load", "smoke_test"), event
    watcher.wait("state", at(2, "refused"))
    assert served(agent) == 1.0
