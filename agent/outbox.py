"""What the agent publishes besides its state: events, telemetry, and drop reports.

Events go to ``devices/<id>/events`` (QoS 1, one JSON document each, see the end of
:mod:`slimfleet.agent.wire`); telemetry to ``devices/<id>/telemetry`` every interval
(QoS 0: dropped while offline). The link calls :meth:`Outbox.dropped` on its own
thread for each message a subscription refused; that only appends to a bounded deque
(:data:`MAX_PENDING_DROPS`, the oldest forgotten when full) and never blocks: the
daemon's listen thread turns the reports into ``message_dropped`` events
(:meth:`Outbox.report_drops`). A refused document is reported once while it is refused
for the same reason (:meth:`Outbox.refusal`): the desired-state subscription re-fetches
retained messages, and a retained forgery must not become an event a minute.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from slimfleet.agent.inbox import Dropped, Message
from slimfleet.agent.report import event_document
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.wire import EVENT_DOWNLOAD_PROGRESS, EVENT_MESSAGE_DROPPED

log = logging.getLogger(__name__)

MAX_PENDING_DROPS = 64  # drop reports waiting for the listen thread

Publish = Callable[[str, bytes, int], bool]  # publish(topic, payload, qos)


class Outbox:
    """Publishes the events and telemetry of ``device``; ``seq()`` is the seq of the
    desired state followed (events without one get it)."""

    def __init__(
        self,
        device: str,
        telemetry: Telemetry,
        *,
        publish: Publish,
        events_topic: str,
        telemetry_topic: str,
        seq: Callable[[], int | None],
    ) -> None:
        self.device = device
        self.telemetry = telemetry
        self._publish = publish
        self._events_topic = events_topic
        self._telemetry_topic = telemetry_topic
        self._seq = seq
        # Appended by the link thread, popped by the listen thread (deque ops are atomic).
        self._drops: deque[Dropped] = deque(maxlen=MAX_PENDING_DROPS)
        # topic -> (payload, why) of the document last refused there; listen thread only.
        self._refused: dict[str, tuple[bytes, str]] = {}

    def emit(self, kind: str, **fields: Any) -> None:
        """Count and publish one event of type ``kind``."""
        event = event_document(kind, **fields)
        self.telemetry.count_event(event)
        self.publish_event(event)

    def refusal(self, message: Message, kind: str, **fields: Any) -> bool:
        """Emit ``kind`` for refusing ``message`` unless the same payload was refused for
        the same reason last time on its topic; whether it was emitted."""
        key = (message.payload, f"{kind}:{fields.get('stage')}:{fields.get('reason')}")
        if self._refused.get(message.topic) == key:
            log.debug("%s refused again for the same reason", message.topic)
            return False
        self._refused[message.topic] = key
        self.emit(kind, **fields)
        return True

    def publish_event(self, event: dict[str, Any]) -> None:
        """Publish an event document (the device and, if missing, the seq added)."""
        event = {**event, "device": self.device}
        if event.get("seq") is None:
            event["seq"] = self._seq()
        if event["type"] != EVENT_DOWNLOAD_PROGRESS:
            log.info("event %s", json.dumps(event))
        self._publish(self._events_topic, json.dumps(event).encode(), 1)

    def dropped(self, report: Dropped) -> None:
        """The link's ``on_drop``: queue the report (never blocks)."""
        self._drops.append(report)

    def report_drops(self) -> None:
        """One ``message_dropped`` event per queued report (standing for ``count`` drops)."""
        while self._drops:
            report = self._drops.popleft()
            self.emit(
                EVENT_MESSAGE_DROPPED,
                topic=report.topic,
                size=report.size,
                limit=report.limit,
                reason=report.reason,
                count=report.suppressed + 1,
            )

    def report_telemetry(self, interval_s: float, stop: threading.Event) -> None:
        """Publish telemetry every ``interval_s`` until ``stop`` is set."""
        while not stop.wait(interval_s):
            try:
                snapshot = self.telemetry.snapshot()
                self._publish(self._telemetry_topic, json.dumps(snapshot).encode(), 0)
            except Exception:  # a bug costs one report, not all the following ones
                log.exception("publishing telemetry failed")
