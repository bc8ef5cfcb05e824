"""desired.json and the replay floor on a real file system."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from slimfleet.agent.deployment import DesiredState, SlotSpec
from slimfleet.agent.desired import (
    DESIRED_FILE,
    LONGEST_WAIT_S,
    MAX_DESIRED_FILE_BYTES,
    Freshness,
    Record,
    load_record,
    merge_freshness,
    notice,
    restore,
    save_record,
    wait_until,
)
from slimfleet.agent.signing import (
    Signer,
    Verifier,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from slimfleet.agent.store import AgentState, ModelStore
from slimfleet.agent.wire import ModelRef


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    return Signer(load_private_key(tmp_path / "k.key"))


@pytest.fixture
def verifier(signer: Signer, tmp_path: Path) -> Verifier:
    return Verifier([load_public_key(tmp_path / "k.pub")])


def record(signer: Signer, seq: int) -> Record:
    now = time.time()
    desired = DesiredState(
        "cam", {"main": SlotSpec((ModelRef("m", seq),))}, signer.key_id, seq, now, now + 60
    )
    return Record(desired, signer.sign(desired.to_dict()))


def test_a_record_round_trips_with_the_floor(tmp_path, signer, verifier) -> None:
    kept = record(signer, 4).with_outcome("refused", "load", "broken")
    save_record(tmp_path, kept, Freshness(4, 123.5))
    assert load_record(tmp_path, verifier) == (kept, Freshness(4, 123.5))


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: b"{trunc",
        lambda doc: json.dumps({**doc, "floor": -1}).encode(),
        lambda doc: json.dumps({**doc, "enrolled": "soon"}).encode(),
        lambda doc: json.dumps({**doc, "outcome": "maybe"}).encode(),
        lambda doc: json.dumps({**doc, "envelope": doc["envelope"].replace("cam", "cat")}).encode(),
        lambda doc: b" " * (MAX_DESIRED_FILE_BYTES + 1),
    ],
    ids=["truncated", "floor", "enrolled", "outcome", "signature", "oversized"],
)
def test_a_damaged_file_is_ignored_and_kept_aside(tmp_path, signer, verifier, damage) -> None:
    save_record(tmp_path, record(signer, 2), Freshness(2, 1.0))
    doc = json.loads((tmp_path / DESIRED_FILE).read_text())
    (tmp_path / DESIRED_FILE).write_bytes(damage(doc))
    assert load_record(tmp_path, verifier) == (None, None)
    assert (tmp_path / f"{DESIRED_FILE}.corrupt").exists()


def test_the_floor_is_the_highest_copy_and_a_wiped_store_enrols_now() -> None:
    assert merge_freshness(Freshness(3, 10.0), Freshness(5, 10.0), now=99.0) == Freshness(5, 10.0)
    assert merge_freshness(None, Freshness(5, 10.0), now=99.0) == Freshness(5, 10.0)
    assert merge_freshness(None, None, now=99.0) == Freshness(0, 99.0)


def test_restore_repairs_the_lower_copy(tmp_path, signer, verifier) -> None:
    store = ModelStore(tmp_path)
    store.save_state(AgentState(floor=2, enrolled=7.0))
    save_record(tmp_path, record(signer, 6), Freshness(6, 7.0))
    state, kept = restore(store, verifier)
    assert state.floor == 6 and kept.desired.seq == 6
    assert store.load_state().floor == 6  # written back


def test_notice_keeps_a_record_only_for_what_the_host_must_see(signer) -> None:
    fresh = record(signer, 3)
    args = {"device": "cam", "enrolled": 0.0, "now": time.time(), "max_skew_s": 300.0}
    refusal, kept = notice(fresh.desired, fresh.envelope, floor=2, **args)
    assert refusal is None and kept.outcome == "pending"
    refusal, kept = notice(fresh.desired, fresh.envelope, floor=3, **args)
    assert refusal.stage == "replay" and kept is None  # a replay: an event only
    future = args | {"now": fresh.desired.issued - 3600}
    refusal, kept = notice(fresh.desired, fresh.envelope, floor=2, **future)
    assert refusal.stage == "skew" and (kept.outcome, kept.stage) == ("refused", "skew")


def test_the_control_thread_waits_for_the_first_deadline_but_never_past_an_hour():
    import time

    assert wait_until(None, None) is None
    now = time.monotonic()
    assert 9 < wait_until(now + 10, None, now + 50) <= 10
    assert wait_until(now - 5) == 0.0
    assert wait_until(now + 1e12) == LONGEST_WAIT_S  # one wait that long would overflow
