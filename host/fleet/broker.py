"""An embedded MQTT broker (amqtt, MQTT 3.1.1) for a machine without one.

Good for the demo and a first try: retained messages work, but they live in memory only
(a restart forgets every published model) and throughput is a fraction of mosquitto's.
Use mosquitto, EMQX or HiveMQ for a real fleet.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

from slimfleet.agent.errors import SlimfleetError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener, anonymous clients, no $SYS or packet logs."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def make_broker(host: str, port: int) -> Any:
    """An amqtt Broker (created inside the event loop that will run it).

    amqtt 0.12.1 sends a connecting client the retained messages of every topic filter
    that any client ever subscribed to; a device would receive other devices' desired
    state and every model's chunks each time it connects. This subclass sends retained
    messages only for the session's own subscriptions, as MQTT 3.1.1 (3.3.1.3) says.
    """
    from amqtt.broker import Broker  # heavy import, only when a broker is wanted

    class FleetBroker(Broker):
        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            subscribers = self._subscriptions.get(subscription[0], [])
            if any(s.client_id == session.client_id for s, _ in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return FleetBroker(broker_config(host, port))


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start listening; return once clients can connect (SlimfleetError if it cannot)."""
        if self._thread is not None:
            raise SlimfleetError("the embedded broker is already running")
        self._started.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise SlimfleetError(f"the embedded broker did not start on {self.url} in {timeout}s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise SlimfleetError(f"cannot start the embedded broker on {self.url}: {self._error}")
        log.info("embedded broker listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down; its retained messages are gone."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()
            self._loop = None

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            broker = make_broker(self.host, self.port)
            await broker.start()
        except Exception as exc:  # amqtt wraps OSError (port in use) in BrokerError
            self._error = exc.__cause__ or exc
            self._started.set()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await broker.shutdown()


def run_broker(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Run the embedded broker in the foreground until SIGINT (Ctrl-C) or SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        with EmbeddedBroker(host, port):
            while not stop.wait(1.0):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
