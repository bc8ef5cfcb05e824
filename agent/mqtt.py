"""Broker settings shared by fleet.yaml and agent.yaml, and paho client construction."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from slimfleet.agent.configfile import Node

PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in. Secrets come from environment variables."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    protocol: str = "3.1.1"
    keepalive: int = 30

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> BrokerSettings:
        """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; raises ValueError."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                f"broker URL must look like mqtt://host:1883 or mqtts://host:8883, got {url!r}"
            )
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_node(cls, node: Node, base_dir: Path) -> BrokerSettings:
        """Parse a ``broker:`` section::

        broker:
          url: mqtts://broker.example:8883
          username_env: SLIMFLEET_MQTT_USER    # optional
          password_env: SLIMFLEET_MQTT_PASSWORD
          ca_file: ca.pem                      # relative to the config file
          protocol: "5"                        # or "3.1.1" (default)
          keepalive: 30
        """
        if isinstance(node.value, str):  # shorthand: broker: mqtt://host:1883
            url_node, node_map = node, {}
        else:
            node.reject_unknown(
                {"url", "username_env", "password_env", "ca_file", "protocol", "keepalive"}
            )
            url_node, node_map = node.require("url"), node.as_mapping()
        try:
            base = cls.from_url(url_node.str())
        except ValueError as exc:
            raise url_node.error(str(exc)) from None
        username = password = None
        for key in ("username_env", "password_env"):
            if key in node_map:
                var = node_map[key].str()
                if var not in os.environ:
                    raise node_map[key].error(f"environment variable {var} is not set")
                if key == "username_env":
                    username = os.environ[var]
                else:
                    password = os.environ[var]
        ca_file = None
        if "ca_file" in node_map:
            ca_file = (base_dir / node_map["ca_file"].str()).resolve()
            if not ca_file.is_file():
                raise node_map["ca_file"].error(f"CA file {ca_file} does not exist")
        protocol = "3.1.1"
        if "protocol" in node_map:
            protocol = str(node_map["protocol"].scalar())
            if protocol not in PROTOCOLS:
                raise node_map["protocol"].error('protocol must be "3.1.1" or "5"')
        keepalive = node_map["keepalive"].int(minimum=5) if "keepalive" in node_map else 30
        return cls(
            base.host,
            base.port,
            base.tls,
            username,
            password,
            ca_file,
            protocol,
            keepalive,
        )


def make_client(
    settings: BrokerSettings, client_id: str, *, persistent: bool = False
) -> mqtt.Client:
    """A paho 2.x client (VERSION2 callbacks) configured for ``settings``; not yet connected.

    ``persistent`` asks the broker to keep the session (subscriptions and queued
    QoS 1 messages) across disconnects: clean_session=False on 3.1.1, and
    clean_start=False with a session expiry on 5 (pass it to ``connect``).
    """
    protocol = PROTOCOLS[settings.protocol]
    kwargs: dict[str, object] = {}
    if protocol == mqtt.MQTTv311:
        kwargs["clean_session"] = not persistent
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        **kwargs,  # type: ignore[arg-type]
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.ca_file) if settings.ca_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client
