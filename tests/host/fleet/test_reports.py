"""Device reports: the schema-2 parsers, and a FleetView fed from a real mosquitto."""

from __future__ import annotations

import json
import time

import pytest
from reportdocs import event_doc, publish, state_doc, telemetry_doc

from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.wire import ModelRef, Topics
from slimfleet.host.fleet.fleetview import FleetView
from slimfleet.host.fleet.reports import (
    MAX_REPORT_BYTES,
    OUTCOME_REFUSED,
    ReportError,
    decode,
    event_label,
    parse_event,
    parse_state,
    parse_telemetry,
)
from slimfleet.host.fleet.watch import FleetFeed, report_filters

OCR3 = ModelRef("ocr", 3)


def test_state_is_parsed_with_desired_outcome_and_unknown_fields_ignored() -> None:
    doc = state_doc(
        "cam-01",
        deployment={"main": [OCR3.to_dict()]},
        desired={"seq": 4, "outcome": "refused", "stage": "smoke_test", "reason": "off by 3"},
    )
    doc["from_the_future"] = {"anything": 1}
    state = parse_state(doc)
    assert state.device == "cam-01" and state.status == "serving"
    assert state.deployment == {"main": (OCR3,)}
    assert state.last_good == {"main": (OCR3,)}
    assert state.desired is not None and state.desired.outcome == OUTCOME_REFUSED
    assert state.desired.settled and state.desired.reason == "off by 3"
    assert state.outcome_for(4) is state.desired and state.outcome_for(5) is None


def test_telemetry_slots_tiers_and_escalation_rate() -> None:
    doc = telemetry_doc("cam-01", slots={"rec": {"requests": 40, "escalations": 10, "tiers": 2}})
    telemetry = parse_telemetry(doc)
    rec = telemetry.slots["rec"]
    assert rec.requests == 40 and rec.escalation_rate == pytest.approx(0.25)
    assert set(rec.tiers) == {"ocr@3", "ocr@2"} and rec.latency.p95 == 6.0
    assert telemetry.rss_bytes == 50_000_000


def test_event_keeps_type_specific_fields_and_bounds_its_label() -> None:
    event = parse_event(event_doc("cam-01", "swap_failed", reason="load failed", extra=7))
    assert event.type == "swap_failed" and event.reason == "load failed"
    assert event.fields["extra"] == 7 and event.model == OCR3
    assert event_label("swap_failed") == "swap_failed"
    assert event_label("made_up_by_a_newer_agent") == "other"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "expected a JSON object"),
        ({**state_doc("d"), "schema": 1}, "state.schema: this host reads schema 2, got 1"),
        ({**state_doc("d"), "ts": "noon"}, "state.ts: expected a number"),
        ({**state_doc("d"), "floor": -1}, "state.floor: expected an integer from 0 to"),
        (
            {**state_doc("d"), "floor": 10**4299},
            "state.floor: expected an integer from 0 to .* got more",
        ),
        ({**state_doc("d"), "deployment": {"Main!": []}}, "invalid slot name"),
        ({**state_doc("d"), "deployment": {"main": [{"name": "x"}]}}, "state.deployment.main"),
        ({k: v for k, v in state_doc("d").items() if k != "started"}, "state.started: missing"),
        ({**state_doc("d"), "ts": -1e308}, "state.ts: expected Unix seconds, got -1e.308"),
        ({**state_doc("d"), "started": 1e20}, "state.started: expected Unix seconds"),
        ({**state_doc("d"), "status": "serving\nFAKE"}, "state.status: expected one of idle,"),
    ],
)
def test_malformed_state_is_one_report_error_naming_the_field(doc, message) -> None:
    with pytest.raises(ReportError, match=message.replace("(", r"\(")):
        parse_state(doc)


def test_a_devices_text_cannot_forge_lines() -> None:
    # a reason holding "\n09:00:00 d1 swap_ok ..." printed a line that looked like d1's
    forged = "bad\n09:00:00 d1 swap_ok slot=main model=big@9 seq=99\r\x1b[2K\u202e"
    event = parse_event(event_doc("j-ev", "swap_failed\nFAKE", reason=forged))
    assert event.type == "swap_failed\\u000aFAKE"
    assert event.reason == (
        "bad\\u000a09:00:00 d1 swap_ok slot=main model=big@9 seq=99\\u000d\\u001b[2K\\u202e"
    )
    assert parse_event(event_doc("d", "swap_ok", reason="plain, ünïcode ok")).reason == (
        "plain, ünïcode ok"
    )


def test_malformed_telemetry_and_events() -> None:
    bad_latency = telemetry_doc("d")
    bad_latency["slots"]["main"]["latency_ms"] = {"p50": float("nan"), "p95": 1}
    with pytest.raises(
        ReportError, match=r"telemetry.slots.main.latency_ms.p50: expected a finite"
    ):
        parse_telemetry(bad_latency)
    with pytest.raises(ReportError, match="event.type: missing"):
        parse_event({"ts": 1, "device": "d"})
    with pytest.raises(ReportError, match="over the"):
        decode(b" " * (MAX_REPORT_BYTES + 1), "x")
    with pytest.raises(ReportError, match="x: not valid JSON"):
        decode(b"\xff", "x")


def test_view_fed_from_mosquitto(mosquitto, prefix) -> None:
    """Retained state and status, live telemetry and events, a malformed report and an
    unknown device, all through a real broker."""
    topics = Topics(prefix)
    view = FleetView(topics, ["cam-01", "cam-02"])
    publish(mosquitto.url, topics.device("cam-01", "state"), state_doc("cam-01"), retain=True)
    publish(mosquitto.url, topics.device("cam-01", "status"), b"online", retain=True)
    publish(mosquitto.url, topics.device("cam-02", "status"), b"offline", retain=True)
    with FleetFeed(BrokerSettings.from_url(mosquitto.url), view.ingest) as feed:
        feed.subscribe(report_filters(topics))
        assert view.get("cam-01").online is True and view.get("cam-01").state is not None
        assert view.get("cam-02").online is False and view.get("cam-02").state is None
        publish(mosquitto.url, topics.device("cam-01", "telemetry"), telemetry_doc("cam-01"))
        publish(mosquitto.url, topics.device("cam-01", "events"), event_doc("cam-01", "swap_ok"))
        publish(mosquitto.url, topics.device("stray-9", "telemetry"), telemetry_doc("stray-9"))
        publish(mosquitto.url, topics.device("cam-02", "state"), b"{not json")
        publish(mosquitto.url, topics.device("cam-02", "telemetry"), telemetry_doc("cam-01"))
        feed.wait(10, until=lambda: view.get("cam-02").problem and view.get("stray-9"))
    cam1, cam2 = view.get("cam-01"), view.get("cam-02")
    assert cam1.telemetry.slots["main"].latency.p50 == 4.0
    assert cam1.last_event.type == "swap_ok" and cam1.events == {"swap_ok": 1}
    assert cam1.totals["main"].requests == 120
    assert "names device 'cam-01'" in cam2.problem
    assert view.rejected == 2
    assert [r.device for r in view.reports()] == ["cam-01", "cam-02", "stray-9"]
    assert not view.get("stray-9").declared
    time.sleep(0.01)
    assert view.forget(0.005) == ["stray-9"]
    assert [r.device for r in view.reports()] == ["cam-01", "cam-02"]


def test_totals_add_up_intervals_and_keep_only_current_tiers(prefix) -> None:
    topics = Topics(prefix)
    view = FleetView(topics)
    topic = topics.device("d1", "telemetry")
    for _ in range(3):
        view.ingest(topic, json.dumps(telemetry_doc("d1", slots={"rec": {"tiers": 2}})).encode())
    assert view.get("d1").totals["rec"].requests == 360
    assert view.get("d1").totals["rec"].tier_runs == {"ocr@3": 360, "ocr@2": 90}
    view.ingest(topic, json.dumps(telemetry_doc("d1", slots={"rec": {"tiers": 1}})).encode())
    assert view.get("d1").totals["rec"].tier_runs == {"ocr@3": 480}


def test_duplicate_ids_are_flagged_on_alternating_starts_not_on_restarts(prefix) -> None:
    topics = Topics(prefix)
    now = [1000.0]
    view = FleetView(topics, clock=lambda: now[0])
    topic = topics.device("d1", "telemetry")

    def report(started: float) -> None:
        view.ingest(topic, json.dumps(telemetry_doc("d1", started=started)).encode())

    for started in (10.0, 10.0, 20.0, 5.0, 5.0):  # restarts, one with the clock set back
        report(started)
    assert view.get("d1").duplicate is None
    report(20.0)  # 20 came back after 5: two agents alternate
    assert "two agents report as d1" in view.get("d1").duplicate
    now[0] += 601
    assert view.get("d1").duplicate is None


def test_view_caps_undeclared_devices(prefix) -> None:
    topics = Topics(prefix)
    view = FleetView(topics, ["a"], max_devices=2)
    for device in ("a", "b", "c"):
        view.ingest(topics.device(device, "status"), b"online")
    assert [r.device for r in view.reports()] == ["a", "b"] and view.dropped == 1
    assert view.ingest(f"{prefix}/models/x/1/manifest", b"{}") is None
    assert view.ingest(topics.device("-" * 300, "status"), b"online") is None
    assert view.rejected == 1 and len(view.reports()) == 2


def test_tier_names_must_be_model_refs_or_remote() -> None:
    doc = telemetry_doc("d", slots={"rec": {"tiers": 2}})
    doc["slots"]["rec"]["tiers"]["x" * 5000] = {"runs": 1}
    with pytest.raises(ReportError, match="a tier is 'name@version' or 'remote'"):
        parse_telemetry(doc)
