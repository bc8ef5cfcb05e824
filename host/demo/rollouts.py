"""The demo's fleet step: staged rollouts watched live with ``slimfleet status``'s code.

While the rollouts run, every device answers pipeline requests (one :class:`Load` per
device) and a :class:`Observer` keeps a live FleetView of the fleet (the view ``status``
and ``monitor`` read) plus every event of the kinds in REFUSALS. A good version rolls out
in two waves; a slow version, published with a smoke-test latency budget it cannot
meet, is refused by the first wave's device and the rollout aborts, sending it back.
Bounds: at most MAX_EVENTS events kept; each Load sends at most LOAD_REQUESTS.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.wire import ModelRef
from slimfleet.host.demo import models
from slimfleet.host.demo.stage import DEVICES, GROUP, OUTCOME_TIMEOUT_S, Stage
from slimfleet.host.demo.traffic import Load
from slimfleet.host.fleet import rollout
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.fleetview import FleetView
from slimfleet.host.fleet.reports import Event
from slimfleet.host.fleet.rollout_policy import RolloutSettings
from slimfleet.host.fleet.status import device_row, format_event, format_table
from slimfleet.host.fleet.watch import FleetFeed, report_filters

Say = Callable[[str], None]
SOAK_S = 2.0
WAVES = "1,100%"
MAX_EVENTS = 100
LOAD_REQUESTS = 20000  # per device, for the whole step
REFUSALS = ("desired_refused", "fallback", "rollback")  # swap_failed repeats desired_refused


class Observer:
    """A live FleetView of the fleet, and the refusal-like events seen.

    ``_events`` is guarded by ``_lock`` (appended on paho's thread, read by the demo).
    """

    def __init__(self, fleet: FleetConfig) -> None:
        self.view = FleetView(fleet.topics, list(fleet.devices))
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._feed = FleetFeed(fleet.broker, self._ingest)
        self._feed.connect()
        self._feed.subscribe(report_filters(fleet.topics))

    def _ingest(self, topic: str, payload: bytes) -> None:
        device = self.view.ingest(topic, payload)
        if device is None or not topic.endswith("/events"):
            return
        event = next((r.last_event for r in self.view.reports() if r.device == device), None)
        if event is not None and event.type in REFUSALS:
            with self._lock:
                if len(self._events) < MAX_EVENTS:
                    self._events.append(event)

    def events_since(self, count: int) -> list[Event]:
        with self._lock:
            return self._events[count:]

    def rows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [device_row(r, now) for r in self.view.reports()]

    def close(self) -> None:
        self._feed.close()


def _roll(stage: Stage, target: ModelRef, say: Say) -> rollout.Record:
    assert stage.link is not None
    settings = RolloutSettings(
        waves=WAVES, soak_s=SOAK_S, timeout_s=OUTCOME_TIMEOUT_S, max_p95_regression=None
    )
    record = rollout.start(stage.fleet, stage.link, target, GROUP, "features", settings)
    return rollout.Driver(stage.fleet, stage.link, record, lambda line: say(f"    {line}")).run()


def _table(observer: Observer, say: Say) -> list[dict[str, Any]]:
    rows = observer.rows()
    for line in format_table(rows).splitlines():
        say(f"    {line}")
    return rows


def rollouts(stage: Stage, good: ModelRef, bad: ModelRef, say: Say) -> dict[str, Any]:
    """``good`` to the group in 2 waves, then ``bad``, whose first wave must abort."""
    observer = Observer(stage.fleet)
    loads = [Load(stage.url(d), models.readings(64, seed=7), LOAD_REQUESTS) for d in DEVICES]
    try:
        time.sleep(SOAK_S)  # a telemetry interval or two of traffic on the old version
        done = _roll(stage, good, say)
        _table(observer, say)
        seen = len(observer.events_since(0))
        aborted = _roll(stage, bad, say)
        for event in observer.events_since(seen):
            say(f"    event {format_event(event)}")
        time.sleep(SOAK_S)  # the restored devices' next telemetry
        rows = _table(observer, say)
    finally:
        tallies = [load.stop() for load in loads]
        observer.close()
    requests, failed = sum(t.total for t in tallies), sum(t.failed for t in tallies)
    back = [r["device"] for r in rows if (r.get("deployment") or {}).get("features") == [str(good)]]
    say(
        f"    {bad}: {aborted.state} in wave {aborted.completed + 1} "
        f"({len(aborted.devices)} device touched); {len(back)} of {len(DEVICES)} devices on "
        f"{good}; {requests} requests during the rollouts, {failed} failed"
    )
    if done.state != rollout.DONE or aborted.state != rollout.ABORTED or len(back) != len(DEVICES):
        raise SlimfleetError(f"the rollouts did not end as expected: {done.state}, {aborted.state}")
    if failed:
        raise SlimfleetError(f"{failed} requests failed during the rollouts")
    return {
        "good": done.state,
        "bad": aborted.state,
        "bad_reason": aborted.reason,
        "back": back,
        "requests": requests,
        "failed": failed,
    }
