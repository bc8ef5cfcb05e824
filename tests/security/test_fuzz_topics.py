"""A bounded fuzz of every topic a real agent subscribes to, on a real mosquitto: its
desired state, the manifests and the chunks of the models a desired state names, and the
root's revocation list.

Payloads are random bytes, random JSON, and mutations of valid signed documents (a byte
flipped, cut short, bytes inserted, a signed field replaced without re-signing). After
each one the agent still answers with m@1's result (a model the honest host signs adds
the same constant, so a mutation that happens to stay valid changes nothing a client
sees), and its state.json is a valid state document. The last test checks the agent
then follows an honest desired state, so it kept handling its messages in order.

Bounds: about 150 examples in all and each wait <= 10 s; the file runs in well under
90 s on a loaded 2-core machine (one agent for the module).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import models
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securefleet import at, served
from security_agent_rig import Publisher

from slimfleet.agent.keyring import issue_revocations, revocation_topic
from slimfleet.agent.store import AgentState
from slimfleet.host.fleet.publish import build_manifest

_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=16,
)
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Fuzzed:
    """One agent serving m@1 (add 1.0) and the honest host's rig and a watcher."""

    def __init__(self, rig: Any, watcher: Any, agent: Any, root: Any) -> None:
        self.rig, self.watcher, self.agent, self.root = rig, watcher, agent, root
        self.revocations = itertools.count(1)
        self.versions = itertools.count(1)
        self.publisher = Publisher(rig.broker_url, "fuzz-security-topic-fuzz")
        self.model = rig.model_file(models.add_const(1.0), "same")

    def check(self) -> None:
        """Still serving add 1.0; state.json is a valid state document."""
        assert served(self.agent) == 1.0
        path: Path = self.agent.store.state_path
        AgentState.from_dict(json.loads(path.read_bytes()))

    def honest(self) -> tuple[int, bytes, list[bytes]]:
        """A fresh version of model f (adds 1.0): its number, signed manifest and chunks,
        not yet published."""
        version = next(self.versions)
        signer = self.rig.fleet.signer()
        manifest, chunks = build_manifest(signer, self.model, "f", version, chunk_size=16 * 1024)
        return version, signer.sign(manifest.to_dict()), chunks

    def put(self, version: int, manifest: bytes, chunks: list[bytes]) -> None:
        """Publish f@version as given (retained), then a desired state naming it."""
        topics = self.rig.topics
        for i, chunk in enumerate(chunks):
            self.publisher.put(topics.chunk("f", version, i), chunk)
        self.publisher.put(topics.manifest("f", version), manifest)
        self.rig.assign(version, name="f")

    def settled(self, seq: int) -> None:
        """Wait until desired state ``seq`` was handled (refused, served, or stuck on a
        chunk or manifest it keeps refusing)."""

        def done(state: dict[str, Any]) -> bool:
            handled = state.get("desired") or {}
            stage = handled.get("stage")
            return at(seq)(state) and (
                handled.get("outcome") != "pending" or stage in ("download", "verify")
            )

        self.watcher.wait("state", done, timeout=10)


@pytest.fixture(scope="module")
def fuzzed(module_agent):
    fuzzed = Fuzzed(*module_agent)
    yield fuzzed
    fuzzed.publisher.close()


@st.composite
def mutation(draw: st.DrawFn, envelope: bool = True) -> Callable[[bytes], bytes]:
    """One change an attacker on the broker could make to a valid payload (to a signed
    ``envelope`` also: a signed field replaced, a field added, neither re-signed). Drawn
    apart from the payload, so that every example draws the same way."""
    op = draw(st.sampled_from(["flip", "cut", "insert"] + (["field", "extra"] if envelope else [])))
    where, xor = draw(st.integers(0, 2**16)), draw(st.integers(1, 255))
    extra, value = draw(st.binary(min_size=1, max_size=16)), draw(_value)
    name = draw(st.text(max_size=8))

    def apply(valid: bytes) -> bytes:
        i = where % len(valid)
        if op == "flip":
            return valid[:i] + bytes([valid[i] ^ xor]) + valid[i + 1 :]
        if op == "cut":
            return valid[: max(1, i)]
        if op == "insert":
            return valid[:i] + extra + valid[i:]
        doc = json.loads(valid)
        if op == "field":
            keys = sorted(doc["signed"])
            doc["signed"][keys[where % len(keys)]] = value
        else:
            doc[name] = value
        return json.dumps(doc).encode()

    return apply


def hostile(valid: bytes, envelope: bool = True) -> st.SearchStrategy[bytes]:
    """Random bytes, random JSON, or ``valid`` mutated."""
    return st.one_of(
        st.binary(min_size=1, max_size=256),
        _value.map(lambda v: json.dumps(v).encode()),
        mutation(envelope).map(lambda change: change(valid)),
    )


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_fuzzed_desired_states_change_nothing(fuzzed, data):
    rig = fuzzed.rig
    valid = rig.desired({"main": "m@1"})  # a fresh seq: even if a mutation stays valid
    payload = data.draw(hostile(valid))
    rig.put_desired(payload)
    rig.put_desired(rig.desired({"main": "m@1"}))  # an honest one after it is followed
    fuzzed.watcher.wait("state", at(rig.seq, "serving"), timeout=10)
    fuzzed.check()


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_fuzzed_manifests_are_refused(fuzzed, data):
    version, manifest, chunks = fuzzed.honest()
    fuzzed.put(version, data.draw(hostile(manifest)), chunks)
    fuzzed.settled(fuzzed.rig.seq)
    fuzzed.check()


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_fuzzed_chunks_are_refused(fuzzed, data):
    version, manifest, chunks = fuzzed.honest()
    chunk = data.draw(hostile(chunks[0], envelope=False))
    fuzzed.put(version, manifest, [chunk, *chunks[1:]])
    fuzzed.settled(fuzzed.rig.seq)
    fuzzed.check()


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_fuzzed_revocation_lists_revoke_nothing_they_should_not(fuzzed, data):
    """Lists the root signed revoke only a key nobody uses; mutated, random or replayed
    ones are refused. The fleet's own key is never revoked, m@1 keeps serving."""
    rig = fuzzed.rig
    valid = issue_revocations(fuzzed.root, next(fuzzed.revocations), ["0" * 16], time.time())
    fuzzed.publisher.put(revocation_topic(rig.fleet.prefix), data.draw(hostile(valid)))
    rig.put_desired(rig.desired({"main": "m@1"}))  # handled after it, in order
    fuzzed.watcher.wait("state", at(rig.seq, "serving"), timeout=10)
    fuzzed.check()
    assert not fuzzed.agent.verifier.is_revoked(rig.fleet.signer().key_id)


def test_after_the_fuzz_the_agent_follows_an_honest_desired_state(fuzzed):
    rig = fuzzed.rig
    rig.publish(models.add_const(5.0), 5)
    rig.assign(5)
    fuzzed.watcher.wait("state", at(rig.seq, "serving"), timeout=20)
    assert served(fuzzed.agent) == 5.0
    assert fuzzed.agent.state.floor == rig.seq
