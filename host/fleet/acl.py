"""Who may do what on the broker: roles as pure functions, and mosquitto's files for them.

Roles (usernames come from fleet.yaml; a device's username is its id):

=========  ==========================================  ====================================
role       reads                                       writes
=========  ==========================================  ====================================
device     ``devices/<own id>/desired``, ``models/#``,  ``devices/<own id>/state``,
           ``keys/#``                                  ``status``, ``telemetry``, ``events``
host       everything under the prefix                 everything under the prefix (models,
                                                       desired states, keys, rollouts)
monitor    everything under the prefix                 nothing
=========  ==========================================  ====================================

Client ids are bound to identities by mosquitto's ``use_username_as_clientid`` on the
listener devices and monitors use (the broker replaces whatever id a client sends with
its username), so no client can take over another's session. The host role gets its
own listener without it: host commands run several connections at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from slimfleet.agent.errors import InputError
from slimfleet.agent.mqtt import read_secret
from slimfleet.agent.wire import MAX_PAYLOAD_BYTES, Topics
from slimfleet.host.fleet.config import FleetConfig, Identities

READ, WRITE, READWRITE = "read", "write", "readwrite"
DEVICE, HOST, MONITOR = "device", "host", "monitor"
DEVICE_WRITES = ("state", "status", "telemetry", "events")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# mosquitto_passwd's defaults for "$7$" hashes: PBKDF2-HMAC-SHA512, 12-byte salt.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
# A whole packet may carry the largest payload plus topic and headers.
MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024
PASSWORD_BYTES = 24  # random bytes per generated password (32 url-safe characters)


@dataclass(frozen=True)
class Grant:
    """``access`` (read, write or readwrite) on an MQTT topic filter."""

    access: str
    topic: str

    def allows(self, access: str) -> bool:
        return self.access in (access, READWRITE)


def role_grants(role: str, prefix: str, username: str) -> list[Grant]:
    """What one identity of ``role`` may read and write under ``prefix``."""
    if role == HOST:
        return [Grant(READWRITE, f"{prefix}/#")]
    if role == MONITOR:
        return [Grant(READ, f"{prefix}/#")]
    if role != DEVICE:
        raise ValueError(f"unknown role {role!r}")
    topics = Topics(prefix)
    reads = [topics.device(username, "desired"), f"{prefix}/models/#", f"{prefix}/keys/#"]
    writes = [topics.device(username, leaf) for leaf in DEVICE_WRITES]
    return [Grant(READ, t) for t in reads] + [Grant(WRITE, t) for t in writes]


def fleet_roles(fleet: FleetConfig) -> dict[str, str]:
    """username -> role for every identity of the fleet (InputError without identities)."""
    ids = require_identities(fleet)
    roles = dict.fromkeys(fleet.devices, DEVICE)
    roles.update(dict.fromkeys(ids.hosts, HOST))
    roles.update(dict.fromkeys(ids.monitors, MONITOR))
    return roles


def fleet_grants(fleet: FleetConfig) -> dict[str, list[Grant]]:
    return {
        user: role_grants(role, fleet.prefix, user) for user, role in fleet_roles(fleet).items()
    }


def require_identities(fleet: FleetConfig) -> Identities:
    if fleet.identities is None:
        raise InputError(f"{fleet.path} has no 'identities:' section: add one to name the users")
    return fleet.identities


# -- topic matching (the embedded broker's ACL) -----------------------------------------
def covers(grant: str, topic: str) -> bool:
    """Whether ACL filter ``grant`` covers ``topic`` (a topic, or a subscription filter:
    every topic the filter can match must be matched by the grant)."""
    want, have = grant.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or have[i] == "#":
            return False
        if level != "+" and level != have[i]:
            return False
    return len(have) == len(want)


def allowed(grants: list[Grant], topic: str, access: str) -> bool:
    return any(g.allows(access) and covers(g.topic, topic) for g in grants)


# -- mosquitto files ----------------------------------------------------------------------
def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A mosquitto ``$7$`` password hash, as ``mosquitto_passwd`` writes it."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (constant-time compare)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, digest = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(got, digest)


def mosquitto_acl(grants: dict[str, list[Grant]]) -> str:
    """An ``acl_file``: one ``user`` block per identity, no patterns."""
    lines = ["# generated by 'slimfleet acl' from fleet.yaml: do not edit, regenerate"]
    for user, user_grants in grants.items():
        lines += ["", f"user {user}"]
        lines += [f"topic {g.access} {g.topic}" for g in user_grants]
    return "\n".join(lines) + "\n"


def password_lines(passwords: dict[str, str]) -> str:
    return "".join(f"{user}:{hash_password(pw)}\n" for user, pw in passwords.items())


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only (mode 0600 from creation on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    tmp.replace(path)


def password_for(identities: Identities, username: str) -> tuple[str, bool]:
    """The password kept in ``<secrets>/<username>.password``, made if missing.

    Returns (password, created). Never logs or prints the password.
    """
    path = identities.secrets / f"{username}.password"
    if path.exists():
        try:
            return read_secret(path), False
        except ValueError as exc:
            raise InputError(f"{exc} (delete it to generate a new password)") from None
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    write_secret(path, password + "\n")
    return password, True


# -- the bundle 'slimfleet acl' writes ------------------------------------------------------
ACL_FILE, DEVICE_PASSWD, HOST_PASSWD, CONF_FILE = (
    "fleet.acl",
    "devices.passwd",
    "host.passwd",
    "mosquitto.conf",
)


@dataclass(frozen=True)
class TlsFiles:
    """The broker's side of mutual TLS: the CA that signs clients, its own cert and key."""

    ca: Path
    cert: Path
    key: Path


def mosquitto_conf(
    out: Path, *, device_port: int, host_port: int, bind: str, tls: TlsFiles | None
) -> str:
    """A mosquitto.conf for the files in ``out``: two authenticated listeners, and
    persistence (mosquitto.db) in ``out`` too.

    The device listener (devices and monitors) forces the client id to the username;
    with ``tls`` it requires a client certificate whose CN is the username. The host
    listener accepts only host users (password, plus a client certificate with ``tls``)
    and keeps their client ids, so host commands can run side by side.
    """

    def listener(port: int, users: str) -> list[str]:
        lines = [f"listener {port} {bind}", "allow_anonymous false", f"acl_file {out / ACL_FILE}"]
        if users:
            lines.append(f"password_file {out / users}")
        if tls:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
            lines += ["require_certificate true", "tls_version tlsv1.2"]
        return lines

    lines = [
        "# generated by 'slimfleet acl' from fleet.yaml: do not edit, regenerate",
        "per_listener_settings true",
        f"message_size_limit {MAX_PAYLOAD_BYTES}",
        f"max_packet_size {MAX_PACKET_BYTES}",
        "# published models are retained messages: keep them across restarts",
        "persistence true",
        f"persistence_location {out}/",
        "",
        "# devices and monitors: the client id is replaced by the username (no takeover)",
        *listener(device_port, "" if tls else DEVICE_PASSWD),
        "use_username_as_clientid true",
        *(["use_identity_as_username true"] if tls else []),
        "",
        "# the host role only: several connections at once, each with its own client id",
        *listener(host_port, HOST_PASSWD),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class AclBundle:
    """What 'slimfleet acl' wrote; passwords are never part of it."""

    out: Path
    files: list[str]
    users: dict[str, str]  # username -> role
    new_passwords: list[str]  # usernames whose password was generated now

    def to_dict(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "files": self.files,
            "users": self.users,
            "new_passwords": self.new_passwords,
        }


def check_host(text: str, what: str) -> str:
    """``text`` when it is an IP address or a host name (dot-separated labels of letters,
    digits, ``-`` and ``_``, at most 253 characters); an InputError naming ``what``
    otherwise. What lands in mosquitto.conf or a certificate must be one token: a
    newline in ``--bind`` once wrote a second directive into the config."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not 0 < len(text) <= 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise InputError(f"{what} {text!r}: not an IP address or host name")
    return text


def check_port(port: int, what: str) -> int:
    """A TCP port from 1 to 65535, else an InputError naming ``what``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"{what} {port!r}: a port is 1 to 65535")
    return port


def write_acl_bundle(
    fleet: FleetConfig,
    out: Path,
    *,
    device_port: int = 8883,
    host_port: int = 8884,
    bind: str = "0.0.0.0",
    tls: TlsFiles | None = None,
) -> AclBundle:
    """Write the ACL, both password files (mode 0600) and mosquitto.conf into ``out``."""
    check_port(device_port, "--device-port")
    check_port(host_port, "--host-port")
    check_host(bind, "--bind")
    if device_port == host_port:
        raise InputError("the device and host listeners need different ports")
    identities = require_identities(fleet)
    roles = fleet_roles(fleet)
    passwords, created = {}, []
    for user in roles:
        passwords[user], new = password_for(identities, user)
        if new:
            created.append(user)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_secret(out / ACL_FILE, mosquitto_acl(fleet_grants(fleet)))
    hosts = {u: p for u, p in passwords.items() if roles[u] == HOST}
    others = {u: p for u, p in passwords.items() if roles[u] != HOST}
    write_secret(out / HOST_PASSWD, password_lines(hosts))
    write_secret(out / DEVICE_PASSWD, password_lines(others))
    conf = mosquitto_conf(out, device_port=device_port, host_port=host_port, bind=bind, tls=tls)
    write_secret(out / CONF_FILE, conf)
    files = [ACL_FILE, HOST_PASSWD, DEVICE_PASSWD, CONF_FILE]
    return AclBundle(out, files, roles, created)


# -- the embedded broker's view of the same roles ---------------------------------------------
@dataclass(frozen=True)
class BrokerPolicy:
    """What the embedded broker enforces: password hashes, the usernames whose client id
    is forced to the username (everyone but the host role), and each user's grants."""

    hashes: dict[str, str]
    bound: frozenset[str]
    grants: dict[str, list[Grant]]

    def admits(self, username: str | None, password: str | None) -> bool:
        hashed = self.hashes.get(username or "")
        return hashed is not None and password is not None and check_password(password, hashed)


def fleet_policy(fleet: FleetConfig) -> BrokerPolicy:
    """The fleet's roles for the embedded broker; passwords as 'slimfleet acl' keeps them."""
    identities = require_identities(fleet)
    roles = fleet_roles(fleet)
    hashes = {user: hash_password(password_for(identities, user)[0]) for user in roles}
    bound = frozenset(user for user, role in roles.items() if role != HOST)
    return BrokerPolicy(hashes, bound, fleet_grants(fleet))
