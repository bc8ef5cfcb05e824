"""fleet.yaml: where the broker is, the topic prefix, the signing key, devices and groups.

Example (the repository's ``fleet.yaml``)::

    broker: mqtt://127.0.0.1:1883     # or a mapping, see BrokerSettings.from_node
    prefix: slimfleet/demo
    keys:
      private: keys/signing.key       # relative to fleet.yaml
      public: keys/signing.pub
      certificate: keys/signing.cert  # optional: the root-signed certificate of the key
      root: keys/root.pub             # optional: the root public key devices pin
      revocations: keys/revoked.json  # optional: local copy of the revocation list
    devices:
      cam-01: {site: lab}             # id -> labels (optional)
    groups:
      canary: [cam-01]
    identities:                       # optional: who may log in to the broker
      secrets: secrets                # generated passwords, <username>.password, mode 0600
      certs: certs                    # 'slimfleet certs' writes the CA and client certs here
      host: [host]                    # usernames of the host role (publish, assign, rollout)
      monitors: [monitor]             # read-only usernames
    # every device id is a username too: see host/fleet/acl.py for what each role may do
    desired_ttl_s: 604800             # desired states expire after this (default 7 days)
    rollouts:                         # defaults of 'slimfleet rollout' (flags override)
      defaults: {waves: "1,10,50,100%", max_failure_rate: 0.0, soak_s: 60}
      groups:
        all: {min_devices: 3, max_failure_rate: 0.1}

The environment variable ``SLIMFLEET_BROKER`` (a broker URL) overrides the URL in the
file, and ``load_fleet(path, broker_url=...)`` overrides both: the same fleet file can
point at a test broker or an embedded one without editing it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from slimfleet.agent.configfile import Node, load_yaml
from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.keyring import KeyRing
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.signing import (
    Signer,
    Verifier,
    key_id,
    load_private_key,
    load_public_key,
    read_pem,
)
from slimfleet.agent.wire import Topics, check_name
from slimfleet.host.fleet.rollout_policy import RolloutSettings
from slimfleet.host.units import MAX_DURATION_S

BROKER_ENV = "SLIMFLEET_BROKER"
DEFAULT_FLEET_FILE = "fleet.yaml"
DEFAULT_DESIRED_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Identities:
    """The broker identities of a fleet: devices (their ids), host and monitor users."""

    secrets: Path
    certs: Path
    hosts: tuple[str, ...] = ("host",)
    monitors: tuple[str, ...] = ("monitor",)


@dataclass(frozen=True)
class FleetConfig:
    """A validated fleet.yaml. Key paths are absolute; the key files are read on use."""

    path: Path
    broker: BrokerSettings
    prefix: str
    private_key: Path
    public_key: Path
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    identities: Identities | None = None
    certificate: Path | None = None
    root_key: Path | None = None
    revocations: Path | None = None
    desired_ttl_s: float = DEFAULT_DESIRED_TTL_S
    rollout_defaults: RolloutSettings = field(default_factory=RolloutSettings)
    rollout_groups: dict[str, RolloutSettings] = field(default_factory=dict)

    def rollout_settings(self, group: str) -> RolloutSettings:
        """The rollout settings of ``group``: its own, else the fleet's defaults."""
        return self.rollout_groups.get(group, self.rollout_defaults)

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def signer(self) -> Signer:
        """The signer for the fleet's private key; InputError if it cannot be read or the
        public key (the one devices pin) is not its pair."""
        if not self.private_key.exists():
            raise InputError(
                f"{self.private_key}: signing key not found (run 'slimfleet keys generate')"
            )
        signer = Signer(load_private_key(self.private_key), self._certificate())
        if key_id(load_public_key(self.public_key)) != signer.key_id:
            raise InputError(
                f"{self.public_key} is not the public key of {self.private_key}: "
                "devices pinning it would refuse everything signed"
            )
        return signer

    def _certificate(self) -> bytes | None:
        """The signing key's certificate, checked like devices check it; None if unset."""
        if self.certificate is None:
            return None
        payload = read_pem(self.certificate, "certificate")
        try:
            cert = self.verifier().certificate(payload, str(self.certificate))
        except VerifyError as exc:
            raise InputError(f"{exc} (run 'slimfleet keys generate --root-key ...')") from None
        if cert.key_id != key_id(load_public_key(self.public_key)):
            raise InputError(
                f"{self.certificate} certifies key {cert.key_id}, not {self.public_key}"
            )
        return payload

    @property
    def revocations_file(self) -> Path:
        """The host's copy of the revocation list (``keys.revocations``, else
        ``revoked.json`` next to the signing key)."""
        return self.revocations or self.private_key.parent / "revoked.json"

    def verifier(self) -> Verifier | KeyRing:
        """What devices trust: the root key (minus the keys the host's copy of the
        revocation list revokes) if fleet.yaml names one, else the public key."""
        if self.root_key is not None:
            root = load_public_key(self.root_key)
            return KeyRing([root], revocations_path=self.revocations_file)
        return Verifier([load_public_key(self.public_key)])

    def with_broker_url(self, url: str) -> FleetConfig:
        """The same fleet on another broker URL (credentials and CA file are kept)."""
        try:
            base = BrokerSettings.from_url(url)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        broker = replace(self.broker, host=base.host, port=base.port, tls=base.tls)
        return replace(self, broker=broker)

    def resolve(self, devices: Iterable[str] = (), groups: Iterable[str] = ()) -> list[str]:
        """Device ids named directly or through groups, in order, without repeats.

        Every device must be declared in fleet.yaml and every group must exist.
        """
        targets: list[str] = []
        for group in groups:
            if group not in self.groups:
                known = ", ".join(sorted(self.groups)) or "none"
                raise InputError(f"unknown group {group!r} in {self.path} (groups: {known})")
            targets += self.groups[group]
        for device in devices:
            if device not in self.devices:
                raise InputError(f"unknown device {device!r}: it is not declared in {self.path}")
            targets.append(device)
        if not targets:
            raise InputError("no devices given: name at least one device or group")
        return list(dict.fromkeys(targets))


def load_fleet(
    path: str | Path = DEFAULT_FLEET_FILE, *, broker_url: str | None = None
) -> FleetConfig:
    """Read and validate fleet.yaml; every problem is a ConfigError naming file and line.

    The broker URL comes from ``broker_url`` if given, else from ``$SLIMFLEET_BROKER``,
    else from the file.
    """
    path = Path(path)
    root = load_yaml(path)
    root.reject_unknown(
        {"broker", "prefix", "keys", "devices", "groups", "identities", "desired_ttl_s", "rollouts"}
    )
    base_dir = path.resolve().parent
    broker = BrokerSettings.from_node(root.require("broker"), base_dir)
    prefix = _prefix(root.require("prefix"))
    private_key, public_key, optional = _keys(root.require("keys"), base_dir)
    devices = _devices(root.get("devices"))
    groups = _groups(root.get("groups"), devices)
    identities = _identities(root.get("identities"), base_dir, devices)
    fleet = FleetConfig(
        path.resolve(),
        broker,
        prefix,
        private_key,
        public_key,
        devices,
        groups,
        identities,
        **optional,
    )
    fleet = _with_deploy_settings(fleet, root)
    override = broker_url or os.environ.get(BROKER_ENV)
    if override:
        try:
            fleet = fleet.with_broker_url(override)
        except InputError as exc:
            source = "broker_url" if broker_url else f"${BROKER_ENV}"
            raise InputError(f"{source}: {exc}") from None
    return fleet


def _prefix(node: Node) -> str:
    try:
        return Topics(node.str()).prefix
    except ValueError as exc:
        raise node.error(str(exc)) from None


def _keys(node: Node, base_dir: Path) -> tuple[Path, Path, dict[str, Path]]:
    """``(private, public, {certificate, root, revocations: path})``; all but the first
    two are optional."""
    optional = {"certificate": "certificate", "root": "root_key", "revocations": "revocations"}
    node.reject_unknown({"private", "public", *optional})
    private = (base_dir / node.require("private").str()).resolve()
    public = (base_dir / node.require("public").str()).resolve()
    if private == public:
        raise node.require("public").error("the public and private key must be different files")
    paths = {
        field: (base_dir / node.require(key).str()).resolve()
        for key, field in optional.items()
        if node.get(key) is not None
    }
    return private, public, paths


def _name(node: Node, what: str) -> str:
    value = node.scalar()
    if not isinstance(value, str):
        raise node.error(f"{what} must be a string, got {value!r}")
    try:
        return check_name(value)
    except ValueError as exc:
        raise node.error(f"{what}: {exc}") from None


def _devices(node: Node | None) -> dict[str, dict[str, str]]:
    if node is None or node.value is None:
        return {}
    devices: dict[str, dict[str, str]] = {}
    for device_id, labels in node.as_mapping().items():
        _name(Node(device_id, labels.path, labels.line, labels.file), "device id")
        if labels.value is None:
            devices[device_id] = {}
            continue
        devices[device_id] = {}
        for key, value in labels.as_mapping().items():
            if isinstance(value.value, bool) or not isinstance(value.value, (str, int, float)):
                raise value.error(
                    f"label {key!r} must be a string or number, got {value.plain()!r}"
                )
            devices[device_id][str(key)] = str(value.value)
    return devices


def _groups(node: Node | None, devices: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    if node is None or node.value is None:
        return {}
    groups: dict[str, list[str]] = {}
    for group, members in node.as_mapping().items():
        _name(Node(group, members.path, members.line, members.file), "group name")
        ids: list[str] = []
        for item in members.items():
            device_id = _name(item, "device id")
            if device_id not in devices:
                raise item.error(f"device {device_id!r} is not declared under 'devices'")
            if device_id in ids:
                raise item.error(f"device {device_id!r} is listed twice in group {group!r}")
            ids.append(device_id)
        if not ids:
            raise members.error(f"group {group!r} has no devices")
        groups[group] = ids
    return groups


def _identities(
    node: Node | None, base_dir: Path, devices: dict[str, dict[str, str]]
) -> Identities | None:
    """The optional ``identities:`` section; usernames are unique across all roles."""
    if node is None:
        return None
    given: dict[str, Node] = {}  # "identities:" alone turns authentication on with defaults
    if node.value is not None:
        node.reject_unknown({"secrets", "certs", "host", "monitors"})
        given = node.as_mapping()
    folder = {}
    for key in ("secrets", "certs"):
        folder[key] = (base_dir / (given[key].str() if key in given else key)).resolve()
    taken = set(devices)
    roles = {"host": ("host",), "monitors": ("monitor",)}
    for key in roles:
        members = given.get(key)
        if members is None:
            continue
        names = []
        for item in members.items():
            name = _name(item, "username")
            if name in taken:
                raise item.error(f"username {name!r} is already a device or another identity")
            taken.add(name)
            names.append(name)
        roles[key] = tuple(names)
    for key, names in roles.items():
        clash = taken.intersection(names) if key not in given else set()
        if clash:
            raise node.error(
                f"the default {key} username {sorted(clash)[0]!r} is already taken: "
                f"name the {key} users"
            )
    if not roles["host"]:
        raise given["host"].error("the host role needs at least one username")
    return Identities(folder["secrets"], folder["certs"], roles["host"], roles["monitors"])


# -- deploy settings: desired-state lifetime and rollout defaults -----------------------

_ROLLOUT_KEYS = {
    "waves",
    "min_devices",
    "max_failure_rate",
    "max_p95_regression",
    "soak_s",
    "timeout_s",
}


def _with_deploy_settings(fleet: FleetConfig, root: Node) -> FleetConfig:
    ttl = root.get("desired_ttl_s")
    desired_ttl_s = (
        ttl.float(minimum=60.0, maximum=MAX_DURATION_S)
        if ttl is not None
        else DEFAULT_DESIRED_TTL_S
    )
    node = root.get("rollouts")
    defaults, per_group = RolloutSettings(), {}
    if node is not None:
        node.reject_unknown({"defaults", "groups"})
        if node.get("defaults") is not None:
            defaults = _rollout(node.require("defaults"), defaults)
        groups = node.get("groups")
        for group, settings in (groups.as_mapping() if groups is not None else {}).items():
            if group not in fleet.groups:
                raise settings.error(f"rollout settings for unknown group {group!r}")
            per_group[group] = _rollout(settings, defaults)
    return replace(
        fleet, desired_ttl_s=desired_ttl_s, rollout_defaults=defaults, rollout_groups=per_group
    )


def _rollout(node: Node, base: RolloutSettings) -> RolloutSettings:
    node.reject_unknown(_ROLLOUT_KEYS)
    changes: dict[str, object] = {}
    for key, value in node.as_mapping().items():
        if key == "waves":  # "1,10,50,100%" or a YAML list of the same items
            items = value.items() if isinstance(value.value, list) else [value]
            changes[key] = ",".join(str(item.scalar()) for item in items)
        elif key == "min_devices":
            changes[key] = value.int(minimum=1)
        elif key == "max_p95_regression" and value.value is None:
            changes[key] = None
        else:
            changes[key] = value.float()
    try:
        return replace(base, **changes).checked()
    except ValueError as exc:
        raise node.error(str(exc)) from None
