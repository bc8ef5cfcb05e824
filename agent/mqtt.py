"""Broker settings shared by fleet.yaml and agent.yaml, and paho client construction."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from slimfleet.agent.configfile import Node
from slimfleet.agent.store import FileTooLarge, read_bounded
from slimfleet.agent.wire import host_port

PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}


# A password file holds one secret line; anything longer is not a password file.
MAX_SECRET_BYTES = 4096
BROKER_KEYS = {
    "url",
    "username",
    "username_env",
    "password_file",
    "password_env",
    "ca_file",
    "cert_file",
    "key_file",
    "protocol",
    "keepalive",
}


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in.

    Secrets are read from files or environment variables named in the config, kept out
    of ``repr`` and never logged. ``cert_file``/``key_file`` are this client's
    certificate for mutual TLS.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    protocol: str = "3.1.1"
    keepalive: int = 30
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{host_port(self.host, self.port)}"

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> BrokerSettings:
        """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; raises ValueError."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                f"broker URL must look like mqtt://host:1883 or mqtts://host:8883, got {url!r}"
            )
        if parts.username or parts.password:
            raise ValueError(
                "put no credentials in the broker URL: use username and password_file "
                "or password_env"
            )
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port
        except ValueError:  # beyond 65535, or not a number
            port = 0
        if port == 0:
            raise ValueError(f"broker URL {url!r}: the port must be 1 to 65535")
        return cls(parts.hostname, port or (8883 if tls else 1883), tls, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_node(cls, node: Node, base_dir: Path) -> BrokerSettings:
        """Parse a ``broker:`` section (paths are relative to the config file)::

        broker:
          url: mqtts://broker.example:8883
          username: cam-01                     # or username_env: SLIMFLEET_MQTT_USER
          password_file: secrets/cam-01.password   # or password_env: SLIMFLEET_MQTT_PASSWORD
          ca_file: certs/ca.pem                # the CA that signed the broker's certificate
          cert_file: certs/cam-01.pem          # this client's certificate (mutual TLS)
          key_file: certs/cam-01.key
          protocol: "5"                        # or "3.1.1" (default)
          keepalive: 30
        """
        if isinstance(node.value, str):  # shorthand: broker: mqtt://host:1883
            url_node, node_map = node, {}
        else:
            node.reject_unknown(BROKER_KEYS)
            url_node, node_map = node.require("url"), node.as_mapping()
        try:
            base = cls.from_url(url_node.str())
        except ValueError as exc:
            raise url_node.error(str(exc)) from None
        username = _one_of(node_map, "username", "username_env", _plain, _from_env)
        password = _one_of(
            node_map,
            "password_file",
            "password_env",
            lambda n: _read_secret(n, base_dir),
            _from_env,
        )
        if password is not None and username is None:
            raise node.error("a password needs a username (username or username_env)")
        files = {
            key: _file(node_map, key, base_dir) for key in ("ca_file", "cert_file", "key_file")
        }
        if (files["cert_file"] is None) != (files["key_file"] is None):
            raise node.error("cert_file and key_file go together (mutual TLS needs both)")
        if not base.tls and (files["ca_file"] or files["cert_file"]):
            raise url_node.error("ca_file, cert_file and key_file need an mqtts:// URL")
        if base.tls:
            _check_tls_files(node_map, files)
        protocol = "3.1.1"
        if "protocol" in node_map:
            protocol = str(node_map["protocol"].scalar())
            if protocol not in PROTOCOLS:
                raise node_map["protocol"].error('protocol must be "3.1.1" or "5"')
        keepalive = (
            node_map["keepalive"].int(minimum=5, maximum=65535) if "keepalive" in node_map else 30
        )
        return cls(
            base.host,
            base.port,
            base.tls,
            username,
            password,
            files["ca_file"],
            protocol,
            keepalive,
            files["cert_file"],
            files["key_file"],
        )


def _check_tls_files(node_map: dict[str, Node], files: dict[str, Path | None]) -> None:
    """Load the TLS files as :func:`client` will, so that a file that is not a PEM
    certificate (or a key that does not match its certificate) is a config error naming
    its key and line, not an SSLError when the agent first connects."""
    context = ssl.create_default_context()
    if files["ca_file"] is not None:
        try:
            context.load_verify_locations(cafile=str(files["ca_file"]))
        except (ssl.SSLError, OSError) as exc:
            raise node_map["ca_file"].error(f"not a PEM CA certificate ({exc})") from None
    if files["cert_file"] is not None and files["key_file"] is not None:
        try:
            context.load_cert_chain(str(files["cert_file"]), str(files["key_file"]))
        except (ssl.SSLError, OSError) as exc:
            raise node_map["cert_file"].error(
                f"cert_file and key_file are not a PEM certificate and its key ({exc})"
            ) from None


def _one_of(
    node_map: dict[str, Node],
    first: str,
    second: str,
    read_first: Callable[[Node], str],
    read_second: Callable[[Node], str],
) -> str | None:
    """The value of whichever of two alternative keys is present (ConfigError if both)."""
    if first in node_map and second in node_map:
        raise node_map[second].error(f"give {first} or {second}, not both")
    if first in node_map:
        return read_first(node_map[first])
    if second in node_map:
        return read_second(node_map[second])
    return None


def _plain(node: Node) -> str:
    return node.str()


def _from_env(node: Node) -> str:
    var = node.str()
    value = os.environ.get(var)
    if not value:
        raise node.error(f"environment variable {var} is not set or empty")
    return value


def read_secret(path: Path) -> str:
    """The first line of a secret file, which must exist, be readable by its owner only,
    hold at most ``MAX_SECRET_BYTES`` and not be blank; ValueError says what is wrong."""
    try:
        raw = read_bounded(path, MAX_SECRET_BYTES)
        private = not path.stat().st_mode & 0o077
    except FileNotFoundError:
        raise ValueError(f"password file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read password file {path}: {exc.strerror or exc}") from None
    except FileTooLarge:
        raise ValueError(f"{path} is over {MAX_SECRET_BYTES} bytes: not a password file") from None
    except ValueError as exc:  # not a regular file
        raise ValueError(f"password file {path}: {exc}") from None
    if not private:
        raise ValueError(f"{path} is readable by others: chmod 600 it")
    lines = raw.decode("utf-8", "replace").splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ValueError(f"password file {path} is empty")
    return secret


def _read_secret(node: Node, base_dir: Path) -> str:
    try:
        return read_secret((base_dir / node.str()).resolve())
    except ValueError as exc:
        raise node.error(str(exc)) from None


def _file(node_map: dict[str, Node], key: str, base_dir: Path) -> Path | None:
    if key not in node_map:
        return None
    path = (base_dir / node_map[key].str()).resolve()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise node_map[key].error(f"{key.replace('_', ' ')} {path} {what}")
    return path


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
            certfile=str(settings.cert_file) if settings.cert_file else None,
            keyfile=str(settings.key_file) if settings.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client
