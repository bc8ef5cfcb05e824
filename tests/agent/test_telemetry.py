"""Telemetry: interval snapshots and the Prometheus registry."""

from __future__ import annotations

import threading
import time

import numpy as np
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimfleet.agent.telemetry import BUCKETS, MAX_SAMPLES, MAX_TIER_SAMPLES, Telemetry
from slimfleet.agent.wire import ModelRef

SCHEMA = {
    "schema",
    "device",
    "ts",
    "started",
    "uptime_s",
    "interval_s",
    "rss_bytes",
    "cpu_percent",
    "client_errors",
    "slots",
}
SLOT_SCHEMA = {
    "model",
    "requests",
    "errors",
    "client_errors",
    "escalations",
    "throughput_rps",
    "latency_ms",
    "tiers",
}


def metrics(telemetry: Telemetry) -> dict[str, float]:
    """Every sample of the text exposition, keyed by name and labels."""
    samples = {}
    for family in text_string_to_metric_families(telemetry.metrics_text().decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_a_snapshot_summarises_the_interval_and_starts_the_next() -> None:
    telemetry = Telemetry("cam-01")
    telemetry.set_deployment({"det": ModelRef("ocr-det", 3), "rec": ModelRef("ocr-rec", 5)})
    latencies = np.random.default_rng(0).uniform(0.001, 0.050, 500)
    for i, latency in enumerate(latencies):
        telemetry.record("det", float(latency), escalations=int(i < 50))
        telemetry.tier_run("det", "ocr-det@3", float(latency))
    for _ in range(20):
        telemetry.record_error("det")
    for _ in range(7):
        telemetry.client_error("det")
    telemetry.client_error(None)
    time.sleep(0.05)
    snapshot = telemetry.snapshot()
    assert set(snapshot) == SCHEMA and snapshot["schema"] == 2
    assert snapshot["device"] == "cam-01" and snapshot["client_errors"] == 1
    det, rec = snapshot["slots"]["det"], snapshot["slots"]["rec"]
    assert set(det) == SLOT_SCHEMA
    assert det["model"] == {"name": "ocr-det", "version": 3}
    assert (det["requests"], det["errors"], det["client_errors"]) == (520, 20, 7)
    assert det["escalations"] == 50
    expected = np.percentile(latencies, [50, 95, 99]) * 1000
    got = [det["latency_ms"][k] for k in ("p50", "p95", "p99")]
    np.testing.assert_allclose(got, expected, atol=0.001)
    tier = det["tiers"]["ocr-det@3"]
    assert tier["runs"] == 500 and set(tier["latency_ms"]) == {"p50", "p95"}
    assert rec["requests"] == 0 and rec["latency_ms"] is None and rec["tiers"] == {}
    assert snapshot["interval_s"] >= 0.05
    assert det["throughput_rps"] == pytest.approx(520 / snapshot["interval_s"], rel=0.01)
    assert snapshot["uptime_s"] >= snapshot["interval_s"]
    assert snapshot["ts"] == pytest.approx(time.time(), abs=5)
    assert snapshot["started"] <= snapshot["ts"]
    assert isinstance(snapshot["rss_bytes"], int) and snapshot["rss_bytes"] > 10 * 1024 * 1024

    after = telemetry.snapshot()
    det = after["slots"]["det"]
    assert (det["requests"], det["errors"], det["throughput_rps"]) == (0, 0, 0.0)
    assert det["latency_ms"] is None  # null when no request succeeded in the interval
    assert after["uptime_s"] >= snapshot["uptime_s"] and after["client_errors"] == 0


def test_no_deployment_has_no_slots_and_old_slots_go() -> None:
    telemetry = Telemetry()
    assert telemetry.snapshot()["slots"] == {}
    telemetry.set_deployment({"a": ModelRef("m", 1)})
    assert list(telemetry.snapshot()["slots"]) == ["a"]
    telemetry.set_deployment({"b": ModelRef("m", 2)})
    assert list(telemetry.snapshot()["slots"]) == ["b"]


def test_cpu_percent_covers_the_interval() -> None:
    telemetry = Telemetry()
    telemetry.snapshot()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU in this process
        pass
    assert telemetry.snapshot()["cpu_percent"] > 10
    time.sleep(0.3)
    assert telemetry.snapshot()["cpu_percent"] < 50


def test_memory_per_interval_is_bounded_but_counts_are_exact() -> None:
    telemetry = Telemetry()
    for _ in range(MAX_SAMPLES + 1000):
        telemetry.record("main", 0.001)
        telemetry.tier_run("main", "m@1", 0.001)
    assert len(telemetry._slots["main"].latencies) == MAX_SAMPLES
    snapshot = telemetry.snapshot()["slots"]["main"]
    assert snapshot["requests"] == MAX_SAMPLES + 1000
    assert snapshot["tiers"]["m@1"]["runs"] == MAX_TIER_SAMPLES


def test_records_from_many_threads_are_all_counted() -> None:
    telemetry = Telemetry()

    def work() -> None:
        for i in range(2000):
            telemetry.record("main", 0.002) if i % 10 else telemetry.record_error("main")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snapshot = telemetry.snapshot()["slots"]["main"]
    assert (snapshot["requests"], snapshot["errors"]) == (8000, 800)
    assert metrics(telemetry)["slimfleet_agent_requests_total{slot=main}"] == 8000


def test_prometheus_text_parses_and_matches_the_counts() -> None:
    telemetry = Telemetry("cam-01")
    telemetry.set_deployment({"main": ModelRef("ocr", 3)})
    for latency in (0.0004, 0.003, 0.003, 0.2, 20.0):
        telemetry.record("main", latency, escalations=int(latency > 1))
    telemetry.record_error("main")
    telemetry.client_error("main")
    telemetry.client_error(None)
    telemetry.count_event({"type": "swap_ok"})
    telemetry.count_event({"type": "swap_ok"})
    telemetry.count_event({"type": "fallback", "reason": "slow"})
    telemetry.snapshot()  # an interval ending does not reset the totals
    samples = metrics(telemetry)
    assert samples["slimfleet_agent_requests_total{slot=main}"] == 6
    assert samples["slimfleet_agent_request_errors_total{slot=main}"] == 1
    assert samples["slimfleet_agent_client_errors_total{slot=main}"] == 1
    assert samples["slimfleet_agent_client_errors_total{slot=}"] == 1
    assert samples["slimfleet_agent_escalations_total{slot=main}"] == 1
    assert samples["slimfleet_agent_request_latency_seconds_count{slot=main}"] == 5
    assert samples["slimfleet_agent_request_latency_seconds_sum{slot=main}"] == pytest.approx(
        20.2064
    )
    buckets = {
        float(k.split("le=")[1].split(",")[0].rstrip("}")): v
        for k, v in samples.items()
        if k.startswith("slimfleet_agent_request_latency_seconds_bucket")
    }
    assert sorted(buckets) == [*BUCKETS, float("inf")]
    assert buckets[0.0005] == 1 and buckets[0.005] == 3 and buckets[0.25] == 4
    assert buckets[10.0] == 4 and buckets[float("inf")] == 5
    assert samples["slimfleet_agent_model_info{name=ocr,slot=main,version=3}"] == 1
    assert samples["slimfleet_agent_events_total{type=swap_ok}"] == 2
    assert samples["slimfleet_agent_events_total{type=fallback}"] == 1
    assert samples["slimfleet_agent_uptime_seconds"] > 0
    assert samples["process_resident_memory_bytes"] > 0

    telemetry.set_deployment({"main": ModelRef("ocr", 4)})
    samples = metrics(telemetry)
    assert "slimfleet_agent_model_info{name=ocr,slot=main,version=3}" not in samples
    assert samples["slimfleet_agent_model_info{name=ocr,slot=main,version=4}"] == 1


def test_the_global_registry_is_left_alone() -> None:
    Telemetry().record("main", 0.01)
    Telemetry().record("main", 0.01)  # two instances must not clash on metric names
    assert b"slimfleet_agent" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
