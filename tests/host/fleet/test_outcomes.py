"""Waiting for device outcomes on a real mosquitto: serving, refused with stage and reason,
pending, superseded, silent devices, and unreadable state documents."""

from __future__ import annotations

import time

import models
import pytest
from devicesim import DeviceSimulator
from reportdocs import state_doc

from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.outcomes import (
    NO_ANSWER,
    PENDING,
    SUPERSEDED,
    Outcome,
    outcome_of,
    read_states,
    wait_for_outcomes,
)
from slimfleet.host.fleet.publish import publish_model
from slimfleet.host.fleet.reports import DeviceState, parse_state


@pytest.fixture
def published_a1(fleet: FleetConfig, tmp_path) -> ModelRef:
    publish_model(fleet, models.save(models.add_one(), tmp_path / "a.onnx"), "a", 1)
    return ModelRef("a", 1)


def state(seq: int, outcome: str, **extra: object) -> DeviceState:
    return parse_state(state_doc("d", desired={"seq": seq, "outcome": outcome, **extra}))


def test_outcome_of_a_state_document() -> None:
    assert outcome_of("d", 3, None).outcome == NO_ANSWER
    assert outcome_of("d", 3, parse_state(state_doc("d"))).outcome == NO_ANSWER
    assert outcome_of("d", 3, state(2, "serving")).outcome == NO_ANSWER
    assert outcome_of("d", 3, state(3, "pending")).outcome == PENDING
    assert outcome_of("d", 3, state(4, "serving")).outcome == SUPERSEDED
    assert outcome_of("d", 3, state(3, "serving")).ok
    refused = outcome_of("d", 3, state(3, "refused", stage="smoke_test", reason="output differs"))
    assert not refused.ok
    assert refused.line() == "d: refused at smoke_test: output differs"
    # a device retrying after a transient failure said "no answer": its reason was hidden
    full = state(3, "pending", stage="download", reason="the store's disk is full")
    assert outcome_of("d", 3, full).line() == (
        "d: pending at download: the store's disk is full (retrying seq 3)"
    )
    assert outcome_of("d", 3, state(3, "pending")).line() == "d: no answer (still working on seq 3)"


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", b'{"schema": 2, "device": "cam-01"}', b"{" * 300_000],
)
def test_unreadable_state_documents_are_no_answer(
    fleet: FleetConfig, payload: bytes, published_a1: ModelRef
) -> None:
    with deploy.connect(fleet) as link:
        link.publish_all([(fleet.topics.device("cam-01", "state"), payload)], confirm=False)
        assert read_states(link, fleet.topics, ["cam-01"]) == {}
        [outcome] = wait_for_outcomes(link, fleet.topics, {"cam-01": 1}, 0.3)
    assert outcome.outcome == NO_ANSWER


def test_waits_for_serving_refused_and_silent_devices(
    fleet: FleetConfig, published_a1: ModelRef
) -> None:
    def decide(device, desired):
        if device == "cam-02":
            return "refused", "smoke_test", "output differs from the manifest's sample"
        return "serving", None, None

    with deploy.connect(fleet) as link, DeviceSimulator(fleet, ["cam-01", "cam-02"], decide):
        sent = deploy.assign(fleet, link, deploy.main_slot(published_a1), list(fleet.devices))
        started = time.monotonic()
        outcomes = wait_for_outcomes(link, fleet.topics, {d.device: d.seq for d in sent}, 2.0)
        waited = time.monotonic() - started
    assert [o.line() for o in outcomes] == [
        "cam-01: serving",
        "cam-02: refused at smoke_test: output differs from the manifest's sample",
        "gate-01: no answer",
    ]
    assert 2.0 <= waited < 6.0  # gate-01 never answers: the wait ends at the timeout


def test_all_answers_end_the_wait_early(fleet: FleetConfig, published_a1: ModelRef) -> None:
    with deploy.connect(fleet) as link, DeviceSimulator(fleet, ["cam-01"]):
        [sent] = deploy.assign(fleet, link, deploy.main_slot(published_a1), ["cam-01"])
        started = time.monotonic()
        assert wait_for_outcomes(link, fleet.topics, {"cam-01": sent.seq}, 30) == [
            Outcome("cam-01", sent.seq, "serving")
        ]
        assert time.monotonic() - started < 10


def test_the_same_seq_issued_by_another_host_is_superseded() -> None:
    report = parse_state(state_doc("d", desired={"seq": 3, "issued": 1000.0}))
    assert outcome_of("d", 3, report, issued=1000.0).ok
    assert outcome_of("d", 3, report, issued=1000.5).outcome == SUPERSEDED
    assert outcome_of("d", 3, report).ok  # without the time sent, the seq decides
