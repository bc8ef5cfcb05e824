"""``slimfleet exporter``: the fleet's reports as Prometheus metrics.

One process subscribes to every device's state, status, telemetry and events, feeds a
:class:`~.fleetview.FleetView`, and serves ``/metrics`` through a custom collector that
builds the families from the view at each scrape (so a device that disappears from the
view disappears from the metrics). Every name, type and label is in the README section
"Watching the fleet".

Bounds (label cardinality): at most ``max_devices`` devices (default
:data:`DEFAULT_MAX_DEVICES`; further undeclared ones are counted in
``slimfleet_exporter_reports_dropped_total`` and ignored), at most 32 slots per device
and 8 tiers plus a remote per slot (the wire limits), event types outside the known set
count as ``type="other"``. Undeclared devices silent for ``forget_after_s`` are dropped;
the per-slot gauges of a device whose last telemetry is older than ``stale_after_s``
are not exported.

Shared subscriptions (``share``): telemetry and events, the bulk, are subscribed as
``$share/<group>/...`` so each message goes to one exporter of the group (MQTT 5; the
connection switches to protocol 5). State and status stay unshared: they are retained,
and a broker does not send retained messages to a new shared subscription (MQTT 5
§4.8.2), and every exporter needs every device's state to label and count it. So with
several exporters, counters are partial sums (add them: ``sum without (instance)``) and
telemetry gauges come from whichever exporter saw the device's latest report.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slimfleet.agent.deployment import http_url
from slimfleet.agent.errors import InputError
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.fleetview import DeviceReport, FleetView
from slimfleet.host.fleet.reports import OUTCOMES, Latency
from slimfleet.host.fleet.watch import FleetFeed, report_filters, shared

log = logging.getLogger(__name__)

DEFAULT_MAX_DEVICES = 2000
DEFAULT_STALE_AFTER_S = 300.0
DEFAULT_FORGET_AFTER_S = 3600.0
QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _quantiles(family: GaugeMetricFamily, labels: list[str], latency: Latency | None) -> None:
    if latency is None:
        return
    for quantile, attr in QUANTILES:
        value = getattr(latency, attr)
        if value is not None:
            family.add_metric([*labels, quantile], value / 1000.0)


class FleetCollector(Collector):
    """Builds every ``slimfleet_*`` family from a FleetView at scrape time."""

    def __init__(
        self,
        view: FleetView,
        feed_connected: threading.Event,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        forget_after_s: float = DEFAULT_FORGET_AFTER_S,
    ) -> None:
        self.view = view
        self.connected = feed_connected
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s

    def collect(self) -> Iterator[Metric]:
        self.view.forget(self.forget_after_s)
        reports = self.view.reports()
        now = self.view.clock()
        d, ds, dst = ["device"], ["device", "slot"], ["device", "slot", "tier"]
        f = {
            "up": _gauge("slimfleet_device_up", "1 if the device's retained status is online.", d),
            "info": _gauge(
                "slimfleet_device_info",
                "Always 1; labels: the agent's status and whether fleet.yaml declares it.",
                [*d, "status", "declared"],
            ),
            "dup": _gauge(
                "slimfleet_device_duplicate",
                "1 while two agents seem to report under this device id.",
                d,
            ),
            "last": _gauge(
                "slimfleet_device_last_report_timestamp_seconds",
                "Device-clock time of its newest state, telemetry or event.",
                d,
            ),
            "rss": _gauge("slimfleet_device_resident_memory_bytes", "Agent resident memory.", d),
            "cpu": _gauge(
                "slimfleet_device_cpu_usage_ratio", "Agent CPU use (1 = one core busy).", d
            ),
            "uptime": _gauge("slimfleet_device_uptime_seconds", "Seconds since agent start.", d),
            "seq": _gauge(
                "slimfleet_device_desired_seq", "Seq of the last desired state the device saw.", d
            ),
            "outcome": _gauge(
                "slimfleet_device_desired_outcome",
                "1 for what became of the last desired state (pending/serving/refused/stale).",
                [*d, "outcome", "stage"],
            ),
            "events": _counter(
                "slimfleet_events", "Events received, by device and type.", [*d, "type"]
            ),
            "model": _gauge(
                "slimfleet_slot_model_info",
                "1 per tier a slot serves now (tier 0 is the first).",
                [*ds, "tier", "model", "version"],
            ),
            "lat": _gauge(
                "slimfleet_slot_latency_seconds",
                "Request latency quantiles over the device's last telemetry interval.",
                [*ds, "quantile"],
            ),
            "req": _counter("slimfleet_slot_requests", "Requests (ok and failed).", ds),
            "err": _counter("slimfleet_slot_errors", "Requests the model failed.", ds),
            "cerr": _counter(
                "slimfleet_slot_client_errors", "Requests refused as the client's fault.", ds
            ),
            "esc": _counter(
                "slimfleet_slot_escalations", "Requests a later tier of the chain answered.", ds
            ),
            "runs": _counter("slimfleet_tier_runs", "Requests each tier ran.", dst),
            "tlat": _gauge(
                "slimfleet_tier_latency_seconds",
                "Tier latency quantiles over the device's last telemetry interval.",
                [*dst, "quantile"],
            ),
        }
        for report in reports:
            self._device(f, report, now)
        yield from f.values()
        yield from self._own()

    def _device(self, f: dict[str, Metric], r: DeviceReport, now: float) -> None:
        device, state, telemetry = r.device, r.state, r.telemetry
        f["up"].add_metric([device], 1.0 if r.online else 0.0)
        status = state.status if state else "unknown"
        f["info"].add_metric([device, status, str(r.declared).lower()], 1.0)
        f["dup"].add_metric([device], 1.0 if r.duplicate else 0.0)
        if r.newest_ts is not None:
            f["last"].add_metric([device], r.newest_ts)
        for kind, count in sorted(r.events.items()):
            f["events"].add_metric([device, kind], count)
        for slot, totals in sorted(r.totals.items()):
            f["req"].add_metric([device, slot], totals.requests)
            f["err"].add_metric([device, slot], totals.errors)
            f["cerr"].add_metric([device, slot], totals.client_errors)
            f["esc"].add_metric([device, slot], totals.escalations)
            for tier, runs in sorted(totals.tier_runs.items()):
                f["runs"].add_metric([device, slot, tier], runs)
        if state is not None:
            for slot, tiers in sorted(state.deployment.items()):
                for i, ref in enumerate(tiers):
                    f["model"].add_metric([device, slot, str(i), ref.name, str(ref.version)], 1.0)
            if state.desired is not None:
                outcome = state.desired.outcome if state.desired.outcome in OUTCOMES else "other"
                f["seq"].add_metric([device], state.desired.seq)
                f["outcome"].add_metric([device, outcome, state.desired.stage or ""], 1.0)
        if telemetry is None or now - telemetry.ts > self.stale_after_s:
            return
        f["rss"].add_metric([device], telemetry.rss_bytes)
        f["cpu"].add_metric([device], telemetry.cpu_percent / 100.0)
        f["uptime"].add_metric([device], telemetry.uptime_s)
        for slot, stats in sorted(telemetry.slots.items()):
            _quantiles(f["lat"], [device, slot], stats.latency)
            for tier, tier_stats in sorted(stats.tiers.items()):
                _quantiles(f["tlat"], [device, slot, tier], tier_stats.latency)

    def _own(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "slimfleet_exporter_broker_connected",
            "1 while the exporter is connected to the broker.",
            value=1.0 if self.connected.is_set() else 0.0,
        )
        yield CounterMetricFamily(
            "slimfleet_exporter_reports_rejected",
            "Malformed device reports ignored.",
            value=self.view.rejected,
        )
        yield CounterMetricFamily(
            "slimfleet_exporter_reports_dropped",
            "Reports of undeclared devices ignored over the device cap.",
            value=self.view.dropped,
        )


def run_exporter(
    fleet: FleetConfig,
    *,
    port: int,
    host: str = "0.0.0.0",
    share: str | None = None,
    max_devices: int = DEFAULT_MAX_DEVICES,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    stop: threading.Event | None = None,
    ready: Callable[[str], object] = log.info,
) -> None:
    """Serve ``/metrics`` on ``host:port`` until ``stop`` is set; ``ready`` is
    called with a line saying where once it serves."""
    stop = stop or threading.Event()
    broker = replace(fleet.broker, protocol="5") if share else fleet.broker
    view = FleetView(fleet.topics, list(fleet.devices), max_devices=max_devices)
    bulk = [shared(f, share) for f in report_filters(fleet.topics, ("telemetry", "events"))]
    with FleetFeed(broker, view.ingest, reconnect=True) as feed:
        feed.subscribe([*report_filters(fleet.topics, ("state", "status")), *bulk])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(view, feed.connected, stale_after_s=stale_after_s))
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        ready(f"serving metrics of {fleet.prefix} on {http_url(host, port, '/metrics')}")
        try:
            while not stop.wait(1.0):
                pass
        finally:
            server.shutdown()
            thread.join(5)
