"""Subscriptions that hand every message to a callback: how host commands read reports.

:class:`FleetFeed` is a :class:`~.mqttio.BrokerLink` whose messages go to
``handler(topic, payload)`` (a :meth:`.fleetview.FleetView.ingest`, a printer...).
:meth:`FleetFeed.subscribe` returns once the broker has sent every retained message of
the filters (the same SUBACK barrier as :meth:`~.mqttio.BrokerLink.read_retained`).

One-shot commands fail on a lost connection like every host command; long-running ones
(``monitor``, ``exporter``, ``events --follow``) pass ``reconnect=True``: paho reconnects
with a backoff of 1 to 30 s and the feed subscribes again, which re-delivers retained
state and status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.wire import Topics
from slimfleet.host.fleet.mqttio import DEFAULT_TIMEOUT_S, BrokerLink
from slimfleet.host.fleet.reports import REPORT_LEAVES

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], object]
RECONNECT_DELAY_S = (1, 30)


def report_filters(topics: Topics, leaves: tuple[str, ...] = REPORT_LEAVES) -> list[str]:
    """``<prefix>/devices/+/<leaf>`` for each leaf."""
    return [topics.all_devices(leaf) for leaf in leaves]


def shared(topic_filter: str, group: str | None) -> str:
    """``$share/<group>/<filter>`` (MQTT 5 shared subscription), or the filter unchanged."""
    if group is None:
        return topic_filter
    if not group or any(c in group for c in "/+#\0"):
        raise InputError(f"invalid share group {group!r}: no '/', '+' or '#'")
    return f"$share/{group}/{topic_filter}"


class FleetFeed(BrokerLink):
    """A subscription delivering every message to ``handler`` (called on paho's thread).

    ``_filters`` (the subscriptions to restore after a reconnect) is written only by
    :meth:`subscribe` before the messages it asks for can arrive, and read by
    ``_on_connect``; ``connected`` is a threading.Event.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        handler: Handler,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        reconnect: bool = False,
    ) -> None:
        super().__init__(settings, timeout=timeout)
        self.handler = handler
        self.reconnect = reconnect
        self.connected = threading.Event()
        self._filters: list[str] = []

    def connect(self) -> None:
        super().connect()
        self.client.reconnect_delay_set(*RECONNECT_DELAY_S)

    def subscribe(self, filters: list[str]) -> None:
        """Subscribe and return once the retained messages of ``filters`` are delivered."""
        self._filters = list(filters)
        codes = self._request(self.client.subscribe([(f, 0) for f in filters]), "subscribing")
        for topic_filter, code in zip(filters, codes, strict=False):
            if code.is_failure:
                raise SlimfleetError(
                    f"{self.settings.url} refused the subscription to {topic_filter} ({code}): "
                    "is this client allowed to read it?"
                )
        barrier = f"{filters[0].removeprefix('$share/')}/_barrier/{self.client_id}"
        self._request(self.client.subscribe(barrier, 0), "subscribing")
        self._request(self.client.unsubscribe(barrier), "unsubscribing")

    def wait(self, seconds: float, until: Callable[[], object] | None = None) -> None:
        """Let messages arrive for ``seconds`` or until ``until()`` is true; raises if the
        connection is lost (unless reconnecting)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._check(mqtt.MQTT_ERR_SUCCESS, "")
            if until is not None and until():
                return
            time.sleep(0.02)

    # -- paho callbacks (network thread) ----------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        super()._on_connect(client, userdata, flags, reason_code, properties)
        if reason_code.is_failure:
            return
        self.connected.set()
        if self._filters:  # a reconnect: the broker forgot a clean session's subscriptions
            log.warning("reconnected to %s; subscribing again", self.settings.url)
            client.subscribe([(f, 0) for f in self._filters])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self.reconnect and self._client is not None:
            log.warning("lost %s (%s); reconnecting", self.settings.url, reason_code)
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            self.handler(message.topic, bytes(message.payload))
        except Exception:  # a bug in a handler must not kill paho's network thread
            log.exception("handling a message on %s failed", message.topic)
