"""An embedded MQTT broker (amqtt, MQTT 3.1.1) for a machine without one.

Good for the demo and a first try: retained messages work, but they live in memory only
(a restart forgets every published model) and throughput is a fraction of mosquitto's.
Use mosquitto, EMQX or HiveMQ for a real fleet.

Given the fleet's :class:`~slimfleet.host.fleet.acl.BrokerPolicy` it enforces the same
roles as the generated mosquitto files (passwords, topic ACL, client id bound to the
username); it has no TLS listener: use mosquitto for mutual TLS.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.wire import host_port
from slimfleet.host.fleet.acl import BrokerPolicy, fleet_policy
from slimfleet.host.fleet.config import DEFAULT_FLEET_FILE, load_fleet
from slimfleet.host.fleet.stopsignals import stop_signals

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener, anonymous clients, no $SYS or packet logs."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def make_broker(host: str, port: int, policy: BrokerPolicy | None = None) -> Any:
    """An amqtt broker (created inside the event loop that will run it).

    With a ``policy`` it admits only the fleet's identities and enforces their roles
    (see :mod:`slimfleet.host.fleet.broker_roles`); without one it is anonymous.
    """
    from slimfleet.host.fleet.broker_roles import FleetBroker, policy_plugins  # heavy: amqtt

    config = broker_config(host, port)
    if policy is not None:
        config["plugins"].update(policy_plugins(policy))
    return FleetBroker(config, policy)


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, policy: BrokerPolicy | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.policy = policy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{host_port(self.host, self.port)}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start listening; return once clients can connect (SlimfleetError if it cannot)."""
        if self._thread is not None:
            raise SlimfleetError("the embedded broker is already running")
        self._started.clear()
        self._error = None
        if not log.isEnabledFor(logging.DEBUG):  # its failures are ours to say, in one line
            logging.getLogger("amqtt").setLevel(logging.CRITICAL)
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
            broker = make_broker(self.host, self.port, self.policy)
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


def run_broker(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    policy: BrokerPolicy | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the embedded broker in the foreground until SIGINT (Ctrl-C) or SIGTERM;
    ``ready`` is told its URL once clients can connect."""
    with stop_signals() as stop, EmbeddedBroker(host, port, policy) as broker:
        if ready is not None:
            ready(broker.url)
        while not stop.wait(1.0):
            pass


def broker_policy(fleet_path: Path | None) -> BrokerPolicy | None:
    """The roles the embedded broker enforces: the fleet's, or None (anonymous)."""
    path = fleet_path or Path(DEFAULT_FLEET_FILE)
    if fleet_path is None and not path.exists():
        return None
    fleet = load_fleet(path)
    if fleet.identities is None:
        if fleet_path is not None:
            raise InputError(f"{path} has no 'identities:' section: nothing to enforce")
        return None
    return fleet_policy(fleet)
