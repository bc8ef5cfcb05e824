"""The amqtt broker the fleet runs embedded, and how it enforces the fleet's roles.

Imported only when an embedded broker is wanted (amqtt is heavy). With a
:class:`~slimfleet.host.fleet.acl.BrokerPolicy`:

- a gate reads each CONNECT before amqtt sees it (within ``CONNECT_TIMEOUT_S``) and
  refuses a missing or wrong password with CONNACK "not authorized". amqtt drops or
  takes over an existing session of the same client id *before* it authenticates, so
  the check cannot wait for an auth plugin.
- for devices and monitors the gate replaces the client id with the username, as
  mosquitto's ``use_username_as_clientid`` does: nobody can take over another's session.
- :class:`FleetTopicPlugin` allows a publish, subscription or delivery only when the
  user's grants cover the topic (see :func:`slimfleet.host.fleet.acl.allowed`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from slimfleet.host.fleet.acl import READ, WRITE, BrokerPolicy, Grant, allowed

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
ACTION_ACCESS = {Action.PUBLISH: WRITE, Action.SUBSCRIBE: READ, Action.RECEIVE: READ}


class FleetTopicPlugin(BaseTopicPlugin):
    """Topic ACL: ``read``/``write`` map each username to the topic filters it may use."""

    @dataclass
    class Config:
        read: dict[str, list[str]] = field(default_factory=dict)
        write: dict[str, list[str]] = field(default_factory=dict)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._grants: dict[str, list[Grant]] = {}
        for access in (READ, WRITE):
            for user, topics in getattr(self.config, access).items():
                self._grants.setdefault(user, []).extend(Grant(access, t) for t in topics)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Any = None
    ) -> bool:
        if session is None or topic is None or action not in ACTION_ACCESS:
            return False
        ok = allowed(self._grants.get(session.username or "", []), topic, ACTION_ACCESS[action])
        if not ok:
            log.info("denied %s %s to %r", action, topic, session.username)
        return ok


def policy_plugins(policy: BrokerPolicy) -> dict[str, Any]:
    """The amqtt plugin configuration that enforces ``policy``'s grants."""
    grants = {
        access: {u: [g.topic for g in gs if g.allows(access)] for u, gs in policy.grants.items()}
        for access in (READ, WRITE)
    }
    return {f"{__name__}.FleetTopicPlugin": grants}


class _Replay(ReaderAdapter):
    """A reader that first returns ``head`` (the CONNECT the gate read), then the stream."""

    def __init__(self, head: bytes, reader: ReaderAdapter) -> None:
        self._head, self._reader = head, reader

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            return await self._reader.read(n)
        if n == -1 or n >= len(self._head):
            head, self._head = self._head, b""
            rest = b"" if n == -1 or n == len(head) else await self._reader.read(n - len(head))
            return head + rest
        head, self._head = self._head[:n], self._head[n:]
        return head

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class FleetBroker(Broker):
    """amqtt with the fleet's gate (see the module docstring) and a retained-message fix.

    amqtt 0.12.1 sends a connecting client the retained messages of every topic filter
    that any client ever subscribed to; a device would receive other devices' desired
    state and every model's chunks each time it connects. This subclass sends retained
    messages only for the session's own subscriptions, as MQTT 3.1.1 (3.3.1.3) says.
    """

    def __init__(self, config: dict[str, Any], policy: BrokerPolicy | None) -> None:
        super().__init__(config)
        self._policy = policy

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        if self._policy is None:
            return await super()._client_connected(listener_name, reader, writer)
        try:
            connect = await asyncio.wait_for(ConnectPacket.from_stream(reader), CONNECT_TIMEOUT_S)
        except Exception as exc:  # a timeout or not an MQTT CONNECT: amqtt's own errors
            log.info("dropped a client before CONNECT: %s", type(exc).__name__)
            await writer.close()
            return None
        username = connect.username if connect.username_flag else None
        password = connect.password if connect.password_flag else None
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if not self._policy.admits(username, password):
            log.warning("refused a client: unknown user or wrong password (user %r)", username)
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            return None
        if username in self._policy.bound and connect.client_id != username:
            connect.client_id, connect.client_id_is_random = username, False
        head = connect.to_bytes()
        return await super()._client_connected(listener_name, _Replay(head, reader), writer)
