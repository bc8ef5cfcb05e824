"""Request latency, errors, memory and CPU: per-interval snapshots and Prometheus metrics.

:meth:`Telemetry.snapshot` returns what the agent publishes on ``devices/<id>/telemetry``
every interval, and starts the next interval::

    {
      "device": "cam-01",            # device id
      "ts": 1732380000.0,            # wall-clock time of the snapshot (Unix seconds)
      "uptime_s": 3600.0,            # since the Telemetry object was created
      "interval_s": 10.0,            # since the previous snapshot
      "model": {"name": "ocr", "version": 3} | null,   # serving now
      "requests": 120,               # requests finished in the interval (ok + failed)
      "errors": 1,                   # of which failed (bad feeds, model errors, no model)
      "throughput_rps": 12.0,        # requests / interval_s
      "latency_ms": {"p50": 4.1, "p95": 6.0, "p99": 7.2} | null,  # of successful requests
      "rss_bytes": 123456789,        # resident memory of the agent process
      "cpu_percent": 35.0            # process CPU since the previous snapshot (100 = one core)
    }

The same counters are exposed for ``/metrics`` through :attr:`Telemetry.registry`, a
private :class:`prometheus_client.CollectorRegistry` (never the global one):
``slimfleet_agent_requests_total``, ``slimfleet_agent_request_errors_total``,
``slimfleet_agent_request_latency_seconds`` (histogram), ``slimfleet_agent_model_info``,
``slimfleet_agent_events_total{type}``, ``slimfleet_agent_uptime_seconds`` and the
standard ``process_*`` metrics.

Recording a request costs one lock, a deque append and a bisect; the Prometheus
families are built only when scraped.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from slimfleet.agent.wire import ModelRef

# Latency histogram bucket upper bounds, seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Latencies kept per interval for percentiles: the most recent ones when traffic is heavy.
MAX_SAMPLES = 65536


class Telemetry:
    """Counts requests for one agent process; thread-safe."""

    def __init__(self, device: str = "") -> None:
        self.device = device
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._interval_start = self._started
        self._latencies: deque[float] = deque(maxlen=MAX_SAMPLES)
        self._requests = 0
        self._errors = 0
        # Totals since start, for Prometheus.
        self._total_requests = 0
        self._total_errors = 0
        self._latency_sum = 0.0
        self._buckets = [0] * (len(BUCKETS) + 1)
        self._events: dict[str, int] = {}
        self._model: ModelRef | None = None
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only sets the reference point
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    # -- hot path -------------------------------------------------------------------

    def record(self, latency_s: float) -> None:
        """One successful request that took ``latency_s`` seconds."""
        with self._lock:
            self._latencies.append(latency_s)
            self._requests += 1
            self._total_requests += 1
            self._latency_sum += latency_s
            self._buckets[bisect_left(BUCKETS, latency_s)] += 1

    def record_error(self) -> None:
        """One failed request."""
        with self._lock:
            self._requests += 1
            self._errors += 1
            self._total_requests += 1
            self._total_errors += 1

    # -- state ----------------------------------------------------------------------

    @property
    def model(self) -> ModelRef | None:
        return self._model

    def set_model(self, ref: ModelRef | None) -> None:
        """The model serving from now on."""
        self._model = ref

    def count_event(self, event: dict[str, Any]) -> None:
        """Count an agent event (swap_ok, fallback, ...) by its type."""
        kind = str(event.get("type", "unknown"))
        with self._lock:
            self._events[kind] = self._events.get(kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The figures of the interval that ends now (schema in the module docstring)."""
        now = time.monotonic()
        with self._lock:
            latencies = np.fromiter(self._latencies, dtype=np.float64)
            requests, errors = self._requests, self._errors
            interval = now - self._interval_start
            self._latencies.clear()
            self._requests = self._errors = 0
            self._interval_start = now
        latency = None  # null when no request succeeded in the interval
        if latencies.size:
            p50, p95, p99 = (
                round(float(v) * 1000, 3) for v in np.percentile(latencies, [50, 95, 99])
            )
            latency = {"p50": p50, "p95": p95, "p99": p99}
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            cpu = self._process.cpu_percent(None)
        return {
            "device": self.device,
            "ts": time.time(),
            "uptime_s": round(now - self._started, 3),
            "interval_s": round(interval, 3),
            "model": self._model.to_dict() if self._model else None,
            "requests": requests,
            "errors": errors,
            "throughput_rps": round(requests / interval, 3) if interval > 0 else 0.0,
            "latency_ms": latency,
            "rss_bytes": rss,
            "cpu_percent": cpu,
        }

    def metrics_text(self) -> bytes:
        """All metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def _collect(self) -> Iterator[Metric]:
        with self._lock:
            total, errors = self._total_requests, self._total_errors
            latency_sum, buckets = self._latency_sum, list(self._buckets)
            events = dict(self._events)
        yield CounterMetricFamily(
            "slimfleet_agent_requests", "Inference requests finished.", value=total
        )
        yield CounterMetricFamily(
            "slimfleet_agent_request_errors", "Inference requests that failed.", value=errors
        )
        cumulative, running = [], 0
        for bound, count in zip((*map(repr, BUCKETS), "+Inf"), buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "slimfleet_agent_request_latency_seconds",
            "Latency of successful inference requests.",
            buckets=cumulative,
            sum_value=latency_sum,
        )
        info = GaugeMetricFamily(
            "slimfleet_agent_model_info", "The model serving now.", labels=["name", "version"]
        )
        if self._model is not None:
            info.add_metric([self._model.name, str(self._model.version)], 1)
        yield info
        family = CounterMetricFamily(
            "slimfleet_agent_events", "Agent events by type.", labels=["type"]
        )
        for kind, count in sorted(events.items()):
            family.add_metric([kind], count)
        yield family
        yield GaugeMetricFamily(
            "slimfleet_agent_uptime_seconds",
            "Seconds since the agent started.",
            value=time.monotonic() - self._started,
        )


class _Collector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        return self._telemetry._collect()
