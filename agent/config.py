"""agent.yaml: who the device is, where the broker is, which keys it trusts, how it serves.

Every value is validated on load (numbers must be finite); a wrong one is a ConfigError naming file and line.
Relative paths are relative to the config file. See ``examples/agent.yaml``::

    device_id: cam-01                    # required, one MQTT topic level
    broker: mqtt://127.0.0.1:1883        # or a mapping, see BrokerSettings.from_node
    prefix: slimfleet/demo               # required, the fleet's topic prefix
    keys: {root: keys/root.pub}          # the fleet's root key(s) (a file or a list)
    public_keys: [keys/signing.pub]      # legacy: plain pinned signing keys
    # at least one of keys.root and public_keys is required (both may be given)
    store_dir: store                     # required, models and state live here
    keep_versions: 3                     # versions of each model kept on disk
    max_model_bytes: 512 MiB             # bigger manifests are refused (int or "N KiB/MiB/GiB")
    threads: 1                           # onnxruntime intra-op threads, 1..1024
    http: {host: 127.0.0.1, port: 8080}  # port 0 picks a free one; absent or null: no HTTP
    telemetry_interval_s: 10             # seconds, at most 86400 (as is watch.window_s)
    smoke: {max_latency_ms: 50}          # device latency budget for the smoke test
    watch: {window_s: 30, min_requests: 20, max_error_rate: 0.05, max_p95_ratio: 1.5}
    max_clock_skew_s: 300                # desired states issued further in the future are refused
    confidence_functions: {ctc_gate: "my_gates:ctc_confidence"}   # names a slot's gate may use
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slimfleet.agent.configfile import Node, load_yaml
from slimfleet.agent.errors import InputError
from slimfleet.agent.httplimits import HttpLimits
from slimfleet.agent.keyring import KeyRing
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.signing import load_public_key
from slimfleet.agent.watch import WatchPolicy
from slimfleet.agent.wire import Topics, check_name

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_MAX_MODEL_BYTES = 512 * 1024**2
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3}
_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3})
_SIZE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
MAX_THREADS = 1024
MAX_INTERVAL_S = 86400  # telemetry interval and watch window: at most a day
DEFAULT_MAX_CLOCK_SKEW_S = 300.0


@dataclass(frozen=True)
class HttpSettings:
    """Where the local HTTP API listens (port 0 picks a free port) and its bounds."""

    host: str = "127.0.0.1"
    port: int = 0
    limits: HttpLimits = field(default_factory=HttpLimits)


@dataclass(frozen=True)
class AgentConfig:
    """A validated agent.yaml; paths are absolute, public keys are loaded.

    ``root_keys`` certify signing keys (see :mod:`slimfleet.agent.keyring`);
    ``public_keys`` are plain pinned signing keys, kept for compatibility.
    """

    path: Path
    device_id: str
    broker: BrokerSettings
    prefix: str
    public_key_files: tuple[Path, ...]
    public_keys: tuple[Ed25519PublicKey, ...]
    store_dir: Path
    keep_versions: int = 3
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    threads: int = 1
    http: HttpSettings | None = None
    telemetry_interval_s: float = 10.0
    smoke_max_latency_ms: float | None = None
    watch: WatchPolicy = field(default_factory=WatchPolicy)
    root_key_files: tuple[Path, ...] = ()
    root_keys: tuple[Ed25519PublicKey, ...] = ()
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S
    confidence_functions: dict[str, str] = field(default_factory=dict)

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def verifier(self, revocations_path: Path | None = None) -> KeyRing:
        """The device's key ring: root keys, pinned keys, and the revocation list saved
        at ``revocations_path`` (if given; see :class:`KeyRing`)."""
        return KeyRing(self.root_keys, self.public_keys, revocations_path=revocations_path)


TOP_KEYS = {
    "device_id",
    "broker",
    "prefix",
    "public_keys",
    "keys",
    "store_dir",
    "keep_versions",
    "max_model_bytes",
    "threads",
    "http",
    "telemetry_interval_s",
    "smoke",
    "watch",
    "max_clock_skew_s",
    "confidence_functions",
}


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read and validate agent.yaml; raises ConfigError naming the file and line."""
    path = Path(path).resolve()
    root = load_yaml(path)
    root.reject_unknown(TOP_KEYS)
    base = path.parent
    device_node = root.require("device_id")
    device_id = device_node.str()
    try:
        check_name(device_id)
    except ValueError as exc:
        raise device_node.error(str(exc)) from None
    prefix_node = root.require("prefix")
    given = prefix_node.str()
    if given != given.strip("/") and given.strip("/"):  # accepted before: kept, and said
        log.warning(
            "%s:%d: prefix %r: slashes at its ends are dropped (the fleet's is %r; "
            "fleet.yaml refuses them)",
            prefix_node.file,
            prefix_node.line,
            given,
            given.strip("/"),
        )
    try:
        prefix = Topics(given.strip("/")).prefix
    except ValueError as exc:
        raise prefix_node.error(str(exc)) from None
    values = root.as_mapping()
    if "keys" not in values and "public_keys" not in values:
        raise root.error("set keys: {root: <the fleet's root public key>} (or public_keys)")
    key_files, keys = _get(values, "public_keys", lambda n: _public_keys(n, base), ((), ()))
    root_files, roots = _get(values, "keys", lambda n: _root_keys(n, base), ((), ()))
    return AgentConfig(
        path=path,
        device_id=device_id,
        broker=BrokerSettings.from_node(root.require("broker"), base),
        prefix=prefix,
        public_key_files=key_files,
        public_keys=keys,
        store_dir=_store_dir(root.require("store_dir"), base),
        keep_versions=_get(values, "keep_versions", _at_least_one, 3),
        max_model_bytes=_get(values, "max_model_bytes", _size, DEFAULT_MAX_MODEL_BYTES),
        threads=_get(values, "threads", lambda n: n.int(minimum=1, maximum=MAX_THREADS), 1),
        http=_http(values.get("http")),
        telemetry_interval_s=_get(values, "telemetry_interval_s", _interval, 10.0),
        smoke_max_latency_ms=_smoke(values.get("smoke")),
        watch=_watch(values.get("watch")),
        root_key_files=root_files,
        root_keys=roots,
        max_clock_skew_s=_get(values, "max_clock_skew_s", _clock_skew, DEFAULT_MAX_CLOCK_SKEW_S),
        confidence_functions=_get(values, "confidence_functions", _functions, {}),
    )


def _root_keys(node: Node, base: Path) -> tuple[tuple[Path, ...], tuple[Ed25519PublicKey, ...]]:
    node.reject_unknown({"root"})
    roots = node.require("root")
    if isinstance(roots.value, str):
        roots = Node([roots], roots.path, roots.line, roots.file)
    return _public_keys(roots, base)


def _public_keys(node: Node, base: Path) -> tuple[tuple[Path, ...], tuple[Ed25519PublicKey, ...]]:
    items = list(node.items())
    if not items:
        raise node.error("list at least one public key file")
    files, keys = [], []
    for item in items:
        file = (base / item.str()).resolve()
        if not file.exists():
            raise item.error(f"public key file {file} does not exist")
        if not file.is_file():
            raise item.error(f"public key file {file} is not a regular file")
        try:
            keys.append(load_public_key(file))
        except InputError as exc:
            raise item.error(str(exc)) from None
        files.append(file)
    return tuple(files), tuple(keys)


def _size(node: Node) -> int:
    value = node.scalar()
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, ""
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise node.error(f"expected a size like 536870912 or '512 MiB', got {value!r}")
        number, unit = int(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if size < 1:
        raise node.error("must be at least 1 byte")
    return size


def _get(values: dict[str, Node], key: str, parse: Callable[[Node], T], default: T) -> T:
    node = values.get(key)
    return default if node is None else parse(node)


def _at_least_one(node: Node) -> int:
    return node.int(minimum=1)


def _store_dir(node: Node, base: Path) -> Path:
    """The store folder: it may not exist yet, but nothing else may sit at its path."""
    path = (base / node.str()).resolve()
    if path.exists() and not path.is_dir():
        raise node.error(f"{path} is not a folder")
    return path


def _positive(node: Node, maximum: float | None = None) -> float:
    value = node.float(maximum=maximum)
    if value <= 0:
        raise node.error(f"must be > 0, got {value:g}")
    return value


def _interval(node: Node) -> float:
    return _positive(node, MAX_INTERVAL_S)


def _http(node: Node | None) -> HttpSettings | None:
    if node is None or node.value is None:
        return None
    node.reject_unknown({"host", "port", *_HTTP_COUNTS, *_HTTP_SECONDS, *_HTTP_SIZES})
    values = node.as_mapping()
    host = values["host"].str() if "host" in values else HttpSettings.host
    port = HttpSettings.port
    if "port" in values:
        port = values["port"].int(minimum=0)
        if port > 65535:
            raise values["port"].error(f"must be <= 65535, got {port}")
    bounds: dict[str, float] = {}
    for key, value in values.items():
        if key in _HTTP_COUNTS:
            bounds[key] = value.int(minimum=1, maximum=4096)
        elif key in _HTTP_SECONDS:
            bounds[key] = _positive(value, maximum=3600)
        elif key in _HTTP_SIZES:
            bounds[key] = _size(value)
    try:
        limits = HttpLimits(**bounds)  # type: ignore[arg-type]
    except ValueError as exc:
        raise node.error(str(exc)) from None
    return HttpSettings(host, port, limits)


# agent.yaml http: keys that set HttpLimits (see agent/httpserver.py for what each bounds)
_HTTP_COUNTS = {"max_connections"}
_HTTP_SECONDS = {"request_timeout_s", "idle_timeout_s"}
_HTTP_SIZES = {"max_json_bytes", "max_binary_bytes", "max_inflight_bytes"}


def _smoke(node: Node | None) -> float | None:
    if node is None or node.value is None:
        return None
    node.reject_unknown({"max_latency_ms"})
    latency = node.get("max_latency_ms")
    if latency is None or latency.value is None:
        return None
    return _positive(latency)


def _watch(node: Node | None) -> WatchPolicy:
    if node is None or node.value is None:
        return WatchPolicy()
    node.reject_unknown({"window_s", "min_requests", "max_error_rate", "max_p95_ratio"})
    values = node.as_mapping()
    default = WatchPolicy()
    return WatchPolicy(
        window_s=_get(
            values,
            "window_s",
            lambda n: n.float(minimum=0, maximum=MAX_INTERVAL_S),
            default.window_s,
        ),
        min_requests=_get(values, "min_requests", _at_least_one, default.min_requests),
        max_error_rate=_get(values, "max_error_rate", _fraction, default.max_error_rate),
        max_p95_ratio=_get(values, "max_p95_ratio", _ratio, default.max_p95_ratio),
    )


def _fraction(node: Node) -> float:
    value = node.float(minimum=0)
    if value > 1:
        raise node.error(f"is a fraction (0.05 means 5%), got {value:g}")
    return value


def _ratio(node: Node) -> float:
    value = node.float()
    if value < 1:
        raise node.error(f"must be >= 1 (1.5 allows a 50% slower p95), got {value:g}")
    return value


def _clock_skew(node: Node) -> float:
    """How far in the device's future a desired state may be issued, 0 to one day."""
    return node.float(minimum=0, maximum=MAX_INTERVAL_S)


def _functions(node: Node) -> dict[str, str]:
    """``{name: "module:attr"}``: confidence functions a slot's gate may name."""
    functions = {}
    for name, value in node.as_mapping().items():
        path = value.str()
        module, sep, attr = path.partition(":")
        if not (sep and module and attr):
            raise value.error(f"confidence function {name}: expected 'module:attr', got {path!r}")
        functions[name] = path
    return functions
