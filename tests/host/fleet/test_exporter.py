"""slimfleet exporter: the collector over a FleetView, and the process on real mosquitto
(scraped over HTTP, stopped by SIGTERM, load split by MQTT 5 shared subscriptions)."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from brokers import free_port, wait_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from reportdocs import (
    OCR2,
    OCR3,
    REPO,
    event_doc,
    one_line_error,
    publish,
    slimfleet,
    start_slimfleet,
    state_doc,
    telemetry_doc,
    write_fleet_file,
)

from slimfleet.agent.wire import Topics
from slimfleet.host.fleet.exporter import FleetCollector
from slimfleet.host.fleet.fleetview import FleetView

Samples = dict[tuple[str, frozenset], float]


def parse_metrics(text: str) -> Samples:
    """(sample name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_view(view: FleetView, **kw) -> Samples:
    connected = threading.Event()
    connected.set()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(view, connected, **kw))
    return parse_metrics(generate_latest(registry).decode())


def feed(view: FleetView, device: str, leaf: str, doc) -> None:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    view.ingest(view.topics.device(device, leaf), body)


def busy_view(prefix: str, now: list[float]) -> FleetView:
    """cam-01 serving a chain with a refused desired state, telemetry twice and two
    events; cam-02 declared and silent; an undeclared offline stray."""
    view = FleetView(Topics(prefix), ["cam-01", "cam-02"], clock=lambda: now[0])
    chain = {"rec": [OCR3, OCR2]}
    refused = {"seq": 7, "outcome": "refused", "stage": "load", "reason": "bad graph"}
    feed(view, "cam-01", "state", state_doc("cam-01", deployment=chain, desired=refused))
    feed(view, "cam-01", "status", b"online")
    slots = {"rec": {"requests": 50, "escalations": 5, "tiers": 2, "p50": 3.0, "p95": 8.0}}
    for _ in range(2):
        feed(view, "cam-01", "telemetry", telemetry_doc("cam-01", slots=slots, ts=now[0]))
    feed(view, "cam-01", "events", event_doc("cam-01", "fallback"))
    feed(view, "cam-01", "events", event_doc("cam-01", "from_a_newer_agent"))
    feed(view, "stray", "status", b"offline")
    return view


def test_collector_exposes_devices_slots_tiers_and_events(prefix: str) -> None:
    now = [time.time()]
    view = busy_view(prefix, now)
    s = scrape_view(view)

    assert value(s, "slimfleet_device_up", device="cam-01") == 1.0
    assert value(s, "slimfleet_device_up", device="cam-02") == 0.0
    assert (
        value(s, "slimfleet_device_info", device="stray", status="unknown", declared="false") == 1
    )
    assert value(s, "slimfleet_device_resident_memory_bytes", device="cam-01") == 50_000_000
    assert value(s, "slimfleet_device_cpu_usage_ratio", device="cam-01") == 0.125
    assert value(s, "slimfleet_device_desired_seq", device="cam-01") == 7
    assert (
        value(
            s, "slimfleet_device_desired_outcome", device="cam-01", outcome="refused", stage="load"
        )
        == 1
    )
    for tier, ref in enumerate((OCR3, OCR2)):
        labels = {"device": "cam-01", "slot": "rec", "tier": str(tier), "model": "ocr"}
        assert value(s, "slimfleet_slot_model_info", **labels, version=str(ref["version"])) == 1
    ds = {"device": "cam-01", "slot": "rec"}
    assert value(s, "slimfleet_slot_latency_seconds", **ds, quantile="0.95") == pytest.approx(0.008)
    assert value(s, "slimfleet_slot_requests_total", **ds) == 100
    assert value(s, "slimfleet_slot_errors_total", **ds) == 2
    assert value(s, "slimfleet_slot_escalations_total", **ds) == 10
    assert value(s, "slimfleet_tier_runs_total", **ds, tier="ocr@2") == 10
    assert value(s, "slimfleet_tier_latency_seconds", **ds, tier="ocr@3", quantile="0.5") == 0.003
    assert value(s, "slimfleet_events_total", device="cam-01", type="fallback") == 1
    assert value(s, "slimfleet_events_total", device="cam-01", type="other") == 1
    assert value(s, "slimfleet_exporter_broker_connected") == 1

    now[0] += 301  # telemetry is stale: its gauges go, counters stay; the stray is forgotten
    s = scrape_view(view, forget_after_s=200)
    assert value(s, "slimfleet_slot_latency_seconds", **ds, quantile="0.95") is None
    assert value(s, "slimfleet_device_resident_memory_bytes", device="cam-01") is None
    assert value(s, "slimfleet_slot_requests_total", **ds) == 100
    assert value(s, "slimfleet_device_up", device="stray") is None
    assert value(s, "slimfleet_device_up", device="cam-02") == 0.0  # declared: stays


def test_readme_documents_every_metric_with_its_type_and_labels(prefix: str) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(busy_view(prefix, [time.time()]), threading.Event()))
    exported = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = sorted({label for sample in family.samples for label in sample.labels})
        exported[name] = (family.type, labels)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Watching the fleet") :]
    documented = {
        m[1]: (m[2], sorted(filter(None, (x.strip() for x in m[3].split(",")))))
        for m in re.finditer(r"^\| `(slimfleet_\w+)` \| (\w+) \|([\w, ]*)\|", section, re.M)
    }
    assert documented == exported


def scrape(port: int, timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return parse_metrics(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_for(port: int, check, timeout: float = 20.0) -> Samples:
    """Scrape until ``check(samples)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


@pytest.fixture
def fleet_file(tmp_path: Path, prefix: str, mosquitto) -> Path:
    return write_fleet_file(tmp_path, prefix, mosquitto.url)


def start_exporter(fleet_file: Path, *args: str) -> tuple[int, object]:
    port = free_port()
    proc = start_slimfleet(
        "exporter", "--fleet", fleet_file, "--port", port, "--host", "127.0.0.1", *args
    )
    wait_port(port, 30)
    return port, proc


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, proc.stderr.read()
    return proc.stderr.read()


def test_exporter_process_serves_reports_and_stops_on_sigterm(
    fleet_file: Path, mosquitto, prefix
) -> None:
    topics = Topics(prefix)
    publish(mosquitto.url, topics.device("cam-01", "state"), state_doc("cam-01"), retain=True)
    publish(mosquitto.url, topics.device("cam-01", "status"), b"online", retain=True)
    port, proc = start_exporter(fleet_file)
    try:
        samples = wait_for(port, lambda s: value(s, "slimfleet_device_up", device="cam-01") == 1)
        assert (
            value(
                samples,
                "slimfleet_slot_model_info",
                device="cam-01",
                slot="main",
                tier="0",
                model="ocr",
                version="3",
            )
            == 1
        )
        publish(mosquitto.url, topics.device("cam-01", "telemetry"), telemetry_doc("cam-01"))
        publish(mosquitto.url, topics.device("cam-01", "status"), b"offline", retain=True)
        samples = wait_for(port, lambda s: value(s, "slimfleet_device_up", device="cam-01") == 0)
        assert value(samples, "slimfleet_slot_requests_total", device="cam-01", slot="main") == 120
    finally:
        err = stop(proc)
    assert "serving metrics of" in err and "Traceback" not in err


def test_exporter_bad_input(fleet_file: Path, tmp_path: Path, prefix: str) -> None:
    port, proc = start_exporter(fleet_file)
    try:
        busy = slimfleet("exporter", "--fleet", fleet_file, "--port", port, "--host", "127.0.0.1")
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in one_line_error(busy)
    finally:
        stop(proc)
    bad = slimfleet("exporter", "--fleet", fleet_file, "--port", free_port(), "--share", "a/b")
    assert bad.returncode == 2 and "invalid share group" in one_line_error(bad)
    dead = write_fleet_file(tmp_path / "dead", prefix, f"mqtt://127.0.0.1:{free_port()}")
    result = slimfleet("exporter", "--fleet", dead, "--port", free_port())
    assert result.returncode == 1 and "cannot reach the MQTT broker" in one_line_error(result)


def test_shared_exporters_split_telemetry_but_both_see_state(
    fleet_file: Path, mosquitto, prefix
) -> None:
    """Two exporters of one share group: every telemetry message reaches exactly one,
    the sum of their counters is the fleet's; retained state reaches both."""
    topics = Topics(prefix)
    publish(mosquitto.url, topics.device("cam-02", "state"), state_doc("cam-02"), retain=True)
    exporters = [start_exporter(fleet_file, "--share", "exp") for _ in range(2)]
    try:
        for port, _ in exporters:
            samples = wait_for(
                port,
                lambda s: value(
                    s, "slimfleet_device_info", device="cam-02", status="serving", declared="true"
                ),
            )
            assert (
                value(
                    samples,
                    "slimfleet_device_info",
                    device="cam-02",
                    status="serving",
                    declared="true",
                )
                == 1
            )
        time.sleep(0.5)  # both shared subscriptions are in place (the SUBACKs came before /metrics)
        sent = 20
        for _ in range(sent):
            doc = telemetry_doc("cam-02", slots={"main": {"requests": 1}})
            publish(mosquitto.url, topics.device("cam-02", "telemetry"), doc)

        def counted(port: int) -> float:
            return (
                value(scrape(port), "slimfleet_slot_requests_total", device="cam-02", slot="main")
                or 0
            )

        deadline = time.monotonic() + 15
        while sum(counted(p) for p, _ in exporters) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        shares = [counted(p) for p, _ in exporters]
        assert sum(shares) == sent and all(share > 0 for share in shares), shares
    finally:
        for _, proc in exporters:
            stop(proc)


def test_exporter_survives_a_broker_restart(tmp_path: Path, prefix: str, own_mosquitto) -> None:
    """While the broker is away the exporter says so; back, it subscribes again."""
    topics = Topics(prefix)
    fleet_file = write_fleet_file(tmp_path, prefix, own_mosquitto.url)
    publish(own_mosquitto.url, topics.device("cam-01", "status"), b"online", retain=True)
    port, proc = start_exporter(fleet_file)
    try:
        wait_for(port, lambda s: value(s, "slimfleet_device_up", device="cam-01") == 1)
        own_mosquitto.stop()
        down = wait_for(port, lambda s: value(s, "slimfleet_exporter_broker_connected") == 0)
        assert value(down, "slimfleet_exporter_broker_connected") == 0
        own_mosquitto.start()
        wait_for(port, lambda s: value(s, "slimfleet_exporter_broker_connected") == 1, 60)
        ds = {"device": "cam-01", "slot": "main"}

        def counted(samples: Samples) -> bool:
            publish(
                own_mosquitto.url, topics.device("cam-01", "telemetry"), telemetry_doc("cam-01")
            )
            return bool(value(samples, "slimfleet_slot_requests_total", **ds))

        assert counted(wait_for(port, counted, 30)), "no telemetry after the reconnect"
    finally:
        err = stop(proc)
    assert "reconnecting" in err and "subscribing again" in err
