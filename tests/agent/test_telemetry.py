"""Telemetry: interval snapshots and the Prometheus registry."""

from __future__ import annotations

import threading
import time

import numpy as np
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimfleet.agent.telemetry import BUCKETS, MAX_SAMPLES, Telemetry
from slimfleet.agent.wire import ModelRef

SCHEMA = {
    "device",
    "ts",
    "uptime_s",
    "interval_s",
    "model",
    "requests",
    "errors",
    "throughput_rps",
    "latency_ms",
    "rss_bytes",
    "cpu_percent",
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
    telemetry.set_model(ModelRef("ocr", 3))
    latencies = np.random.default_rng(0).uniform(0.001, 0.050, 500)
    for latency in latencies:
        telemetry.record(float(latency))
    for _ in range(20):
        telemetry.record_error()
    time.sleep(0.05)
    snapshot = telemetry.snapshot()
    assert set(snapshot) == SCHEMA
    assert snapshot["device"] == "cam-01"
    assert snapshot["model"] == {"name": "ocr", "version": 3}
    assert (snapshot["requests"], snapshot["errors"]) == (520, 20)
    expected = np.percentile(latencies, [50, 95, 99]) * 1000
    got = [snapshot["latency_ms"][k] for k in ("p50", "p95", "p99")]
    np.testing.assert_allclose(got, expected, atol=0.001)
    assert snapshot["interval_s"] >= 0.05
    assert snapshot["throughput_rps"] == pytest.approx(520 / snapshot["interval_s"], rel=0.01)
    assert snapshot["uptime_s"] >= snapshot["interval_s"]
    assert snapshot["ts"] == pytest.approx(time.time(), abs=5)
    assert isinstance(snapshot["rss_bytes"], int) and snapshot["rss_bytes"] > 10 * 1024 * 1024

    after = telemetry.snapshot()
    assert (after["requests"], after["errors"], after["throughput_rps"]) == (0, 0, 0.0)
    assert after["latency_ms"] is None  # null when no request succeeded in the interval
    assert after["uptime_s"] >= snapshot["uptime_s"]


def test_no_model_is_null() -> None:
    assert Telemetry().snapshot()["model"] is None


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
        telemetry.record(0.001)
    assert len(telemetry._latencies) == MAX_SAMPLES
    assert telemetry.snapshot()["requests"] == MAX_SAMPLES + 1000


def test_records_from_many_threads_are_all_counted() -> None:
    telemetry = Telemetry()

    def work() -> None:
        for i in range(2000):
            telemetry.record(0.002) if i % 10 else telemetry.record_error()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snapshot = telemetry.snapshot()
    assert (snapshot["requests"], snapshot["errors"]) == (8000, 800)
    assert metrics(telemetry)["slimfleet_agent_requests_total"] == 8000


def test_prometheus_text_parses_and_matches_the_counts() -> None:
    telemetry = Telemetry("cam-01")
    telemetry.set_model(ModelRef("ocr", 3))
    for latency in (0.0004, 0.003, 0.003, 0.2, 20.0):
        telemetry.record(latency)
    telemetry.record_error()
    telemetry.count_event({"type": "swap_ok"})
    telemetry.count_event({"type": "swap_ok"})
    telemetry.count_event({"type": "fallback", "reason": "slow"})
    telemetry.snapshot()  # an interval ending does not reset the totals
    samples = metrics(telemetry)
    assert samples["slimfleet_agent_requests_total"] == 6
    assert samples["slimfleet_agent_request_errors_total"] == 1
    assert samples["slimfleet_agent_request_latency_seconds_count"] == 5
    assert samples["slimfleet_agent_request_latency_seconds_sum"] == pytest.approx(20.2064)
    buckets = {
        float(k.split("le=")[1].rstrip("}")): v
        for k, v in samples.items()
        if k.startswith("slimfleet_agent_request_latency_seconds_bucket")
    }
    assert sorted(buckets) == [*BUCKETS, float("inf")]
    assert buckets[0.0005] == 1 and buckets[0.005] == 3 and buckets[0.25] == 4
    assert buckets[10.0] == 4 and buckets[float("inf")] == 5
    assert samples["slimfleet_agent_model_info{name=ocr,version=3}"] == 1
    assert samples["slimfleet_agent_events_total{type=swap_ok}"] == 2
    assert samples["slimfleet_agent_events_total{type=fallback}"] == 1
    assert samples["slimfleet_agent_uptime_seconds"] > 0
    assert samples["process_resident_memory_bytes"] > 0

    telemetry.set_model(ModelRef("ocr", 4))
    samples = metrics(telemetry)
    assert "slimfleet_agent_model_info{name=ocr,version=3}" not in samples
    assert samples["slimfleet_agent_model_info{name=ocr,version=4}"] == 1


def test_the_global_registry_is_left_alone() -> None:
    Telemetry().record(0.01)
    Telemetry().record(0.01)  # two instances must not clash on metric names
    assert b"slimfleet_agent" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
