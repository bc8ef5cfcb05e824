"""A real Prometheus server scrapes slimfleet exporter; the test asks it through its HTTP
API. Needs the `prometheus` binary (Debian: apt-get install -y prometheus; .ci/run
installs it where apt-get exists)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import free_port, wait_port
from reportdocs import (
    OCR2,
    OCR3,
    REPO,
    Publisher,
    event_doc,
    publish,
    start_slimfleet,
    state_doc,
    telemetry_doc,
    write_fleet_file,
)

from slimfleet.agent.wire import Topics

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary (Debian: apt-get install -y prometheus)"
)


@pytest.fixture
def exporter(tmp_path: Path, prefix: str, mosquitto) -> Iterator[int]:
    """An exporter on mosquitto, fed retained state and live telemetry and events."""
    topics = Topics(prefix)
    url = mosquitto.url
    chain = {"rec": [OCR3, OCR2]}
    publish(
        url,
        topics.device("cam-01", "state"),
        state_doc("cam-01", deployment=chain, desired={"seq": 3}),
        retain=True,
    )
    publish(url, topics.device("cam-01", "status"), b"online", retain=True)
    publish(url, topics.device("cam-02", "status"), b"offline", retain=True)
    fleet_file = write_fleet_file(tmp_path, prefix, url)
    port = free_port()
    proc = start_slimfleet("exporter", "--fleet", fleet_file, "--port", port, "--host", "127.0.0.1")
    slots = {"rec": {"requests": 10, "escalations": 4, "tiers": 2, "p50": 2.0, "p95": 7.0}}

    def live():
        yield topics.device("cam-01", "telemetry"), telemetry_doc("cam-01", slots=slots)
        yield (
            topics.device("cam-01", "events"),
            event_doc("cam-01", "fallback", reason="tier failed"),
        )

    try:
        wait_port(port, 30)
        with Publisher(url, live, period=0.5):
            yield port
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def prometheus(tmp_path: Path, exporter: int) -> Iterator[str]:
    """A Prometheus scraping the exporter every second; yields its base URL."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: slimfleet\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        doc = json.load(response)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def eventually(base: str, promql: str, timeout: float = 60.0) -> list[dict]:
    """The query's result once it is not empty (Prometheus scrapes every second)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = query(base, promql)
        except OSError:
            result = []
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def by_device(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["device"]: float(r["value"][1]) for r in result}


def test_prometheus_scrapes_the_exporter(prometheus: str) -> None:
    up = eventually(prometheus, 'up{job="slimfleet"} == 1')
    assert up, "Prometheus never scraped the exporter successfully"
    assert by_device(eventually(prometheus, "slimfleet_device_up")) == {
        "cam-01": 1.0,
        "cam-02": 0.0,
        "gate-01": 0.0,
    }
    p95 = eventually(prometheus, 'slimfleet_slot_latency_seconds{quantile="0.95"}')
    assert [(r["metric"]["slot"], float(r["value"][1])) for r in p95] == [("rec", 0.007)]
    versions = eventually(
        prometheus, 'count by (model, version) (slimfleet_slot_model_info{tier="0"})'
    )
    assert [(r["metric"]["model"], r["metric"]["version"]) for r in versions] == [("ocr", "3")]
    requests = eventually(prometheus, "slimfleet_slot_requests_total > 10")
    assert requests and float(requests[0]["value"][1]) % 10 == 0
    escalations = eventually(prometheus, "slimfleet_slot_escalations_total")
    assert escalations[0]["metric"] == {
        "__name__": "slimfleet_slot_escalations_total",
        "device": "cam-01",
        "slot": "rec",
        "instance": escalations[0]["metric"]["instance"],
        "job": "slimfleet",
    }
    fallbacks = eventually(prometheus, 'slimfleet_events_total{type="fallback"}')
    assert by_device(fallbacks)["cam-01"] >= 1
    outcome = eventually(prometheus, 'slimfleet_device_desired_outcome{outcome="serving"}')
    assert by_device(outcome) == {"cam-01": 1.0}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in dashboards/slimfleet.json, with the
    dashboard variables set to "All"."""
    doc = json.loads((REPO / "dashboards" / "slimfleet.json").read_text())
    return [
        (panel["title"], target["expr"].replace("$device", ".*").replace("$slot", ".*"))
        for panel in doc["panels"]
        for target in panel.get("targets", [])
    ]


def test_every_dashboard_query_evaluates_with_data(prometheus: str) -> None:
    """Every panel's query is valid PromQL on the exporter's metrics and, once a few
    scrapes are in, returns data (a typo in a metric or label name returns nothing)."""
    assert eventually(prometheus, "count_over_time(slimfleet_slot_requests_total[1m]) > 3")
    queries = dashboard_queries()
    assert len(queries) > 20
    empty = [title for title, promql in queries if not eventually(prometheus, promql, 10)]
    assert empty == []
