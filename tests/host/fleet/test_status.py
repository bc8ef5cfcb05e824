"""slimfleet status, events, models and monitor as a user runs them, on real mosquitto.

Agents do not speak schema 2 yet: the tests publish contract-shaped documents
(tests/reportdocs.py), retained state and status first, live telemetry and events while
the command waits.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from brokers import free_port
from reportdocs import (
    OCR2,
    Publisher,
    event_doc,
    one_line_error,
    publish,
    slimfleet,
    start_slimfleet,
    state_doc,
    telemetry_doc,
    write_fleet_file,
)

from slimfleet.agent.signing import Signer, generate_keypair, load_private_key
from slimfleet.agent.wire import Topics, make_manifest
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.publish import publish_model


@pytest.fixture
def fleet_file(tmp_path: Path, prefix: str, mosquitto) -> Path:
    return write_fleet_file(tmp_path, prefix, mosquitto.url)


@pytest.fixture
def fleet_reports(mosquitto, prefix: str):
    """Retained state/status for the declared devices and an undeclared one, and a
    publisher of live telemetry (gate-01's from two agents started at 1 and 2)."""
    topics = Topics(prefix)
    url = mosquitto.url
    chain = {"main": [{"name": "ocr", "version": 3}, OCR2]}
    publish(
        url, topics.device("cam-01", "state"), state_doc("cam-01", desired={"seq": 2}), retain=True
    )
    refused = {"seq": 5, "outcome": "refused", "stage": "smoke_test", "reason": "output off by 3"}
    publish(
        url,
        topics.device("cam-02", "state"),
        state_doc("cam-02", deployment=chain, desired=refused),
        retain=True,
    )
    publish(url, topics.device("stray-7", "state"), state_doc("stray-7"), retain=True)
    for device, status in (("cam-01", b"online"), ("cam-02", b"online"), ("gate-01", b"online")):
        publish(url, topics.device(device, "status"), status, retain=True)
    publish(url, topics.device("stray-7", "status"), b"offline", retain=True)
    flip = [0]

    def live():
        flip[0] += 1
        yield topics.device("cam-01", "telemetry"), telemetry_doc("cam-01")
        slots = {"main": {"requests": 100, "escalations": 25, "tiers": 2, "p50": 2.0, "p95": 9.5}}
        yield topics.device("cam-02", "telemetry"), telemetry_doc("cam-02", slots=slots)
        started = 1.0 + flip[0] % 2
        yield topics.device("gate-01", "telemetry"), telemetry_doc("gate-01", started=started)
        yield topics.device("cam-01", "events"), event_doc("cam-01", "swap_ok")

    with Publisher(url, live):
        yield topics


def test_status_json_one_row_per_device(fleet_file: Path, fleet_reports) -> None:
    result = slimfleet("status", "--fleet", fleet_file, "--json", "--wait", "3s")
    assert result.returncode == 0, result.stderr
    rows = {r["device"]: r for r in json.loads(result.stdout)["devices"]}
    assert list(rows) == ["cam-01", "cam-02", "gate-01", "stray-7"]
    cam1, cam2, gate, stray = rows.values()
    assert cam1["online"] is True and cam1["deployment"] == {"main": ["ocr@3"]}
    assert cam1["desired"]["outcome"] == "serving" and cam1["slots"]["main"]["p95_ms"] == 6.0
    assert cam1["slots"]["main"]["escalation_rate"] is None  # no chain
    assert cam1["rss_bytes"] == 50_000_000 and cam1["age_s"] < 30
    assert cam2["deployment"] == {"main": ["ocr@3", "ocr@2"]}
    assert cam2["desired"] == {
        "seq": 5,
        "outcome": "refused",
        "stage": "smoke_test",
        "reason": "output off by 3",
        "deployment": {"main": ["ocr@3", "ocr@2"]},
    }
    assert cam2["slots"]["main"]["escalation_rate"] == pytest.approx(0.25)
    assert "two agents report as gate-01" in gate["duplicate"]
    assert gate["deployment"] is None and cam1["duplicate"] is None
    assert stray["declared"] is False and stray["online"] is False


def test_status_table_and_group(fleet_file: Path, fleet_reports) -> None:
    result = slimfleet("status", "--fleet", fleet_file, "--wait", "3s")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "ONLINE", "DEPLOYMENT"]
    cam2 = next(line for line in lines if line.startswith("cam-02"))
    assert cam2.split()[1:3] == ["online", "serving"]
    assert "main=ocr@3>ocr@2" in cam2 and "#5 refused (smoke_test: output off by 3)" in cam2
    assert "2.0/9.5" in cam2 and "main 25%" in cam2 and "47.7 MiB" in cam2
    assert any(line.startswith("stray-7 (undeclared)") for line in lines)
    assert any(line.startswith("! duplicate id gate-01") for line in lines)

    canary = slimfleet("status", "--fleet", fleet_file, "--json", "--group", "canary")
    assert canary.returncode == 0, canary.stderr
    assert [r["device"] for r in json.loads(canary.stdout)["devices"]] == ["cam-01"]


def test_bad_input_is_one_line(fleet_file: Path, tmp_path: Path, prefix: str) -> None:
    result = slimfleet("status", "--fleet", fleet_file, "--group", "nope")
    assert result.returncode == 2
    assert "unknown group 'nope'" in one_line_error(result)
    dead = write_fleet_file(tmp_path / "dead", prefix, f"mqtt://127.0.0.1:{free_port()}")
    for command in ("status", "models", "events", "monitor --once"):
        result = slimfleet(*command.split(), "--fleet", dead)
        assert result.returncode == 1, (command, result.stderr)
        assert "cannot reach the MQTT broker" in one_line_error(result)
    result = slimfleet("status", "--fleet", fleet_file, "--wait", "10 parsecs")
    assert result.returncode == 2 and "expected a duration" in result.stderr
    result = slimfleet("events", "--fleet", fleet_file, "--device", "../etc")
    assert result.returncode == 2 and "invalid name" in one_line_error(result)


def test_events_for_one_device_then_follow_until_ctrl_c(
    fleet_file: Path, mosquitto, prefix
) -> None:
    topics = Topics(prefix)

    def live():
        yield (
            topics.device("cam-01", "events"),
            event_doc("cam-01", "swap_failed", reason="load failed"),
        )
        yield topics.device("cam-02", "events"), event_doc("cam-02", "swap_ok")
        yield topics.device("cam-01", "events"), b"{broken"
        yield topics.device("cam-01", "events"), event_doc("cam-02", "swap_ok")

    with Publisher(mosquitto.url, live):
        result = slimfleet(
            "events", "--fleet", fleet_file, "--device", "cam-01", "--json", "--wait", "2s"
        )
        assert result.returncode == 0, result.stderr
        got = [json.loads(line) for line in result.stdout.splitlines()]
        assert got and {e["device"] for e in got} == {"cam-01"}
        assert got[0]["type"] == "swap_failed" and got[0]["reason"] == "load failed"
        assert "warning: " in result.stderr and "not valid JSON" in result.stderr
        assert "the event names device 'cam-02'" in result.stderr

        follow = start_slimfleet("events", "--fleet", fleet_file, "--follow")
        first = follow.stdout.readline()
        assert " swap_" in first and "slot=main model=ocr@3 seq=1" in first, first
        follow.send_signal(signal.SIGINT)
        assert follow.wait(20) == 0
        assert "stopped" in follow.stderr.read()


def test_models_lists_versions_signatures_and_devices(
    fleet_file: Path, outdir: Path, tmp_path
) -> None:
    fleet = load_fleet(fleet_file)
    publish_model(fleet, outdir, "ocr", 1, ttl_s=3600)
    publish_model(fleet, outdir / "model.onnx", "ocr", 2, chunk_size=4096)
    other = tmp_path / "other"
    generate_keypair(other / "k", other / "k.pub")
    forger = Signer(load_private_key(other / "k"))
    manifest, _ = make_manifest("evil", 1, b"x" * 10, io={}, opset=17, key_id=forger.key_id)
    publish(
        fleet.broker.url,
        fleet.topics.manifest("evil", 1),
        forger.sign(manifest.to_dict()),
        retain=True,
    )
    running = state_doc("cam-01", deployment={"main": [{"name": "ocr", "version": 2}]})
    publish(fleet.broker.url, fleet.topics.device("cam-01", "state"), running, retain=True)

    result = slimfleet("models", "--fleet", fleet_file, "--json")
    assert result.returncode == 0, result.stderr
    got = {f"{m['name']}@{m['version']}": m for m in json.loads(result.stdout)}
    assert list(got) == ["evil@1", "ocr@1", "ocr@2"]
    assert got["ocr@1"]["signature_valid"] is True and got["ocr@1"]["expires"] is not None
    assert got["ocr@2"]["chunks"] > 1 and got["ocr@2"]["devices"] == ["cam-01/main"]
    assert got["ocr@2"]["key_id"] == fleet.signer().key_id and got["ocr@2"]["expires"] is None
    assert got["evil@1"]["signature_valid"] is False
    assert "signed by unknown key" in got["evil@1"]["problem"]

    text = slimfleet("models", "--fleet", fleet_file)
    assert text.returncode == 0, text.stderr
    line = next(line for line in text.stdout.splitlines() if line.startswith("ocr@2"))
    assert "valid" in line and "never" in line and "cam-01/main" in line


def test_monitor_once_and_for_a_bounded_time(fleet_file: Path, fleet_reports) -> None:
    once = slimfleet("monitor", "--fleet", fleet_file, "--once", "--wait", "3s")
    assert once.returncode == 0, once.stderr
    assert "DEVICE" in once.stdout and "cam-02" in once.stdout and "refused" in once.stdout
    assert "duplicate id gate-01" in once.stdout

    start = time.monotonic()
    live = slimfleet("monitor", "--fleet", fleet_file, "--duration", "3s", "--refresh", "0.5s")
    assert live.returncode == 0, live.stderr
    assert time.monotonic() - start < 60
    assert "cam-01" in live.stdout and "latest events:" in live.stdout
    assert "cam-01 swap_ok slot=main" in live.stdout
    both = slimfleet("monitor", "--fleet", fleet_file, "--once", "--duration", "3s")
    assert both.returncode == 2 and "--once prints one frame" in both.stderr


def test_monitor_stops_cleanly_on_ctrl_c(fleet_file: Path, fleet_reports) -> None:
    proc = start_slimfleet("monitor", "--fleet", fleet_file, "--refresh", "0.2s")
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0, proc.stderr.read()
    out = proc.stdout.read()
    assert "monitor stopped" in out and "cam-01" in out
