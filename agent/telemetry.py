"""Requests, errors, escalations and tier runs per slot, memory and CPU: snapshots and metrics.

:meth:`Telemetry.snapshot` returns what the agent publishes on ``devices/<id>/telemetry``
every interval (schema 2, see the end of :mod:`slimfleet.agent.wire`) and starts the
next interval::

    {"schema": 2, "device": "cam-01", "ts": <unix s>, "started": <unix s>,
     "uptime_s": 3600.0, "interval_s": 10.0, "rss_bytes": 123456789, "cpu_percent": 35.0,
     "client_errors": 0,              # requests naming no slot of the deployment (404)
     "slots": {"det": {"model": {"name", "version"} | null,   # the slot's first tier
                       "requests": 120, "errors": 1,          # errors: the model's own
                       "client_errors": 2,                    # 4xx, never the model's
                       "escalations": 0, "throughput_rps": 12.0,
                       "latency_ms": {"p50", "p95", "p99"} | null,
                       "tiers": {"ocr-det@3": {"runs": 120, "latency_ms": {"p50", "p95"}}}}}}

``client_errors`` at the top level is an addition to the wire contract. A slot appears
while it is in the serving deployment or had requests in the interval.

``/metrics`` (:meth:`Telemetry.metrics_text`, a private registry, never the global one):
``slimfleet_agent_requests_total{slot}``, ``slimfleet_agent_request_errors_total{slot}``,
``slimfleet_agent_client_errors_total{slot}``, ``slimfleet_agent_escalations_total{slot}``,
``slimfleet_agent_request_latency_seconds{slot}`` (histogram),
``slimfleet_agent_model_info{slot,name,version}``, ``slimfleet_agent_events_total{type}``,
``slimfleet_agent_uptime_seconds`` and the standard ``process_*`` metrics.

Bounds: at most ``MAX_SAMPLES`` latencies per slot and ``MAX_TIER_SAMPLES`` per tier
are kept per interval (the most recent); counters exist only for the slots of the
serving deployment (at most deployment.MAX_SLOTS) and slots with requests this interval.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
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

from slimfleet.agent.deployment import SCHEMA_VERSION_DESIRED
from slimfleet.agent.wire import ModelRef

# Latency histogram bucket upper bounds, seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_SAMPLES = 65536  # latencies kept per slot per interval
MAX_TIER_SAMPLES = 8192  # latencies kept per tier per interval


@dataclass
class _Counts:
    """One slot's figures: ``latencies``/``tiers`` per interval, ``total_*`` since start."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    escalations: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    tiers: dict[str, deque[float]] = field(default_factory=dict)
    total_requests: int = 0
    total_errors: int = 0
    total_client_errors: int = 0
    total_escalations: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def start_interval(self) -> None:
        self.requests = self.errors = self.client_errors = self.escalations = 0
        self.latencies.clear()
        self.tiers = {}


def _percentiles(values: np.ndarray, which: tuple[int, ...]) -> dict[str, float] | None:
    if not values.size:
        return None
    return {
        f"p{p}": round(float(v) * 1000, 3)
        for p, v in zip(which, np.percentile(values, which), strict=True)
    }


class Telemetry:
    """Counts requests per slot for one agent process; thread-safe."""

    def __init__(self, device: str = "") -> None:
        self.device = device
        #: Guards _slots, _models, _events, _unrouted and _interval_start.
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.started_at = time.time()
        self._interval_start = self._started
        self._slots: dict[str, _Counts] = {}
        self._models: dict[str, ModelRef] = {}
        self._events: dict[str, int] = {}
        self._unrouted = [0, 0]  # client errors naming no slot: [interval, total]
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only sets the reference point
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    # -- hot path (one lock each) -----------------------------------------------------

    def _counts(self, slot: str) -> _Counts:
        counts = self._slots.get(slot)
        if counts is None:
            counts = self._slots[slot] = _Counts()
        return counts

    def record(self, slot: str, latency_s: float, escalations: int = 0) -> None:
        """One request of ``slot`` answered in ``latency_s`` seconds."""
        with self._lock:
            c = self._counts(slot)
            c.latencies.append(latency_s)
            c.requests += 1
            c.total_requests += 1
            c.escalations += bool(escalations)
            c.total_escalations += bool(escalations)
            c.latency_sum += latency_s
            c.buckets[bisect_left(BUCKETS, latency_s)] += 1

    def record_error(self, slot: str) -> None:
        """One request the model of ``slot`` failed (counts against the model)."""
        with self._lock:
            c = self._counts(slot)
            c.requests += 1
            c.errors += 1
            c.total_requests += 1
            c.total_errors += 1

    def client_error(self, slot: str | None) -> None:
        """One request the client got wrong (4xx); ``None`` when it named no known slot."""
        with self._lock:
            if slot is None:
                self._unrouted[0] += 1
                self._unrouted[1] += 1
                return
            c = self._counts(slot)
            c.client_errors += 1
            c.total_client_errors += 1

    def tier_run(self, slot: str, label: str, latency_s: float) -> None:
        """One run of one tier (``name@version`` or ``remote``) of ``slot``."""
        with self._lock:
            tiers = self._counts(slot).tiers
            runs = tiers.get(label)
            if runs is None:
                runs = tiers[label] = deque(maxlen=MAX_TIER_SAMPLES)
            runs.append(latency_s)

    # -- state ----------------------------------------------------------------------

    def models(self) -> dict[str, ModelRef]:
        """Each slot's first tier in the serving deployment."""
        with self._lock:
            return dict(self._models)

    def set_deployment(self, models: dict[str, ModelRef]) -> None:
        """The serving deployment changed: ``{slot: first tier}``."""
        with self._lock:
            self._models = dict(models)
            for slot in [s for s, c in self._slots.items() if s not in models and not c.requests]:
                del self._slots[slot]

    def count_event(self, event: dict[str, Any]) -> None:
        """Count an agent event (swap_ok, fallback, ...) by its type."""
        kind = str(event.get("type", "unknown"))
        with self._lock:
            self._events[kind] = self._events.get(kind, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """The figures of the interval that ends now (schema in the module docstring)."""
        now = time.monotonic()
        slots = {}
        with self._lock:
            interval = now - self._interval_start
            self._interval_start = now
            unrouted, self._unrouted[0] = self._unrouted[0], 0
            for slot in sorted(set(self._slots) | set(self._models)):
                c = self._counts(slot)
                model = self._models.get(slot)
                slots[slot] = {
                    "model": model.to_dict() if model else None,
                    "requests": c.requests,
                    "errors": c.errors,
                    "client_errors": c.client_errors,
                    "escalations": c.escalations,
                    "throughput_rps": round(c.requests / interval, 3) if interval > 0 else 0.0,
                    "latency_ms": np.fromiter(c.latencies, dtype=np.float64),
                    "tiers": {k: np.fromiter(v, dtype=np.float64) for k, v in c.tiers.items()},
                }
                c.start_interval()
        for figures in slots.values():  # percentiles outside the lock
            figures["latency_ms"] = _percentiles(figures["latency_ms"], (50, 95, 99))
            figures["tiers"] = {
                k: {"runs": int(v.size), "latency_ms": _percentiles(v, (50, 95))}
                for k, v in sorted(figures["tiers"].items())
            }
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            cpu = self._process.cpu_percent(None)
        return {
            "schema": SCHEMA_VERSION_DESIRED,
            "device": self.device,
            "ts": time.time(),
            "started": self.started_at,
            "uptime_s": round(now - self._started, 3),
            "interval_s": round(interval, 3),
            "rss_bytes": rss,
            "cpu_percent": cpu,
            "client_errors": unrouted,
            "slots": slots,
        }

    def metrics_text(self) -> bytes:
        """All metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def _collect(self) -> Iterator[Metric]:
        with self._lock:
            totals = {
                slot: (
                    c.total_requests,
                    c.total_errors,
                    c.total_client_errors,
                    c.total_escalations,
                    c.latency_sum,
                    list(c.buckets),
                )
                for slot, c in self._slots.items()
            }
            unrouted = self._unrouted[1]
            models = dict(self._models)
            events = dict(self._events)
        families = {
            name: CounterMetricFamily(f"slimfleet_agent_{name}", text, labels=["slot"])
            for name, text in (
                ("requests", "Inference requests finished."),
                ("request_errors", "Inference requests the model failed."),
                ("client_errors", "Requests the client got wrong (4xx)."),
                ("escalations", "Requests a later tier answered."),
            )
        }
        histogram = HistogramMetricFamily(
            "slimfleet_agent_request_latency_seconds",
            "Latency of successful inference requests.",
            labels=["slot"],
        )
        families["client_errors"].add_metric([""], unrouted)
        for slot, (requests, errors, client, escalations, total, buckets) in sorted(totals.items()):
            for name, value in zip(families, (requests, errors, client, escalations), strict=True):
                families[name].add_metric([slot], value)
            cumulative, running = [], 0
            for bound, count in zip((*map(repr, BUCKETS), "+Inf"), buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric([slot], cumulative, total)
        yield from families.values()
        yield histogram
        info = GaugeMetricFamily(
            "slimfleet_agent_model_info",
            "The first tier of each slot serving now.",
            labels=["slot", "name", "version"],
        )
        for slot, ref in sorted(models.items()):
            info.add_metric([slot, ref.name, str(ref.version)], 1)
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
