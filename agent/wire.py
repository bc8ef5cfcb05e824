"""The wire format: MQTT topics, the signed model manifest, chunks and message bodies.

Everything a third party needs to write a monitor or an agent is defined here and
documented in the README ("Wire format"). All bodies are UTF-8 JSON except chunks,
which are raw bytes. Documents that change what a device runs (manifests, desired
state) travel inside a signed envelope, see :mod:`slimfleet.agent.signing`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slimfleet.agent.errors import VerifyError

SCHEMA_VERSION = 1
DEFAULT_CHUNK_SIZE = 256 * 1024
# mosquitto 2.1 rejects packets over 2 MB by default; leave room for topic and headers.
MAX_PAYLOAD_BYTES = 2 * 1024 * 1024 - 64 * 1024

# Event types an agent publishes on devices/<id>/events.
EVENT_DOWNLOAD_PROGRESS = "download_progress"
EVENT_VERIFY_FAILED = "verify_failed"
EVENT_SWAP_STARTED = "swap_started"
EVENT_SWAP_OK = "swap_ok"
EVENT_SWAP_FAILED = "swap_failed"
EVENT_FALLBACK = "fallback"


class Topics:
    """Topic names under one fleet prefix, e.g. ``slimfleet/demo``.

    ==========================================  ========  ===========================
    topic                                       retained  body
    ==========================================  ========  ===========================
    models/<name>/<version>/manifest            yes       signed manifest envelope
    models/<name>/<version>/chunk/<i>           yes       raw bytes of chunk i
    devices/<id>/desired                        yes       signed desired-state envelope
    devices/<id>/state                          yes       agent state (JSON)
    devices/<id>/status                         yes       "online" / "offline" (Last Will)
    devices/<id>/telemetry                      no        telemetry (JSON)
    devices/<id>/events                         no        one event (JSON)
    ==========================================  ========  ===========================
    """

    def __init__(self, prefix: str) -> None:
        """``prefix`` as given (ValueError when it is no prefix every client reads alike:
        empty, with a leading, trailing or double '/', a leading '$' (the broker's own
        topics), a wildcard, a space or a NUL)."""
        if not prefix or prefix != prefix.strip("/") or "//" in prefix:
            raise ValueError(
                f"prefix must not start or end with '/', contain '//' or be empty, got {prefix!r}"
            )
        if prefix.startswith("$") or any(c in prefix for c in "+# \0"):
            raise ValueError(
                f"prefix must not start with '$' or contain '+', '#' or spaces: {prefix!r}"
            )
        self.prefix = prefix

    def manifest(self, name: str, version: int) -> str:
        return f"{self.prefix}/models/{name}/{version}/manifest"

    def chunk(self, name: str, version: int, index: int) -> str:
        return f"{self.prefix}/models/{name}/{version}/chunk/{index}"

    def device(self, device_id: str, leaf: str) -> str:
        """``devices/<id>/<leaf>``; leaf is desired, state, status, telemetry or events."""
        return f"{self.prefix}/devices/{device_id}/{leaf}"

    def all_devices(self, leaf: str) -> str:
        """A subscription filter for one leaf of every device."""
        return f"{self.prefix}/devices/+/{leaf}"

    def parse_device_topic(self, topic: str) -> tuple[str, str] | None:
        """Return ``(device_id, leaf)`` for a device topic under this prefix, else None."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :].split("/")
        if len(rest) != 2:
            return None
        return rest[0], rest[1]


_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SAFE_INT = 2**53 - 1
"""The largest integer every JSON reader reads exactly: the bound of a desired state's
seq and of the counts a device reports (a floor of 10**4300 once broke the host)."""
MAX_VERSION = 2**63 - 1
"""Versions fit a signed 64-bit integer (19 digits): a version names a folder and is a
JSON number every client reads exactly."""
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    """Model names and device ids become topic levels and folder names: ASCII letters,
    digits, '_', '.' and '-', not starting with '.' or '-' (so never '.' or '..')."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(
            f"invalid name {name!r}: use 1 to 128 letters, digits, '_', '.' or '-', "
            "starting with a letter, digit or '_'"
        )
    return name


def host_port(host: str, port: int) -> str:
    """``host:port`` for a URL, an IPv6 address in brackets (``[::1]:1883``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_version(version: object) -> int:
    """A model version: an integer from 1 to :data:`MAX_VERSION` (ValueError otherwise)."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"model version must be an integer, got {version!r}")
    if not 1 <= version <= MAX_VERSION:
        raise ValueError(f"model version must be from 1 to {MAX_VERSION}, got {version}")
    return version


def finite(value: Any) -> bool:
    """A JSON number (not a bool) that is a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def canonical_json(doc: Any) -> bytes:
    """The exact bytes that are signed: sorted keys, no spaces, ASCII only."""
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Cut a file into fixed-size blocks (the last one may be shorter)."""
    if not 0 < chunk_size <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"chunk size must be between 1 and {MAX_PAYLOAD_BYTES} bytes")
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


# -- tensors ------------------------------------------------------------------------


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """A JSON-safe tensor: dtype, shape and little-endian bytes in base64."""
    array = np.ascontiguousarray(array)
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": base64.b64encode(array.astype(array.dtype.newbyteorder("<")).tobytes()).decode(),
    }


def decode_tensor(doc: Any, where: str = "tensor") -> np.ndarray:
    try:
        dtype = np.dtype(doc["dtype"]).newbyteorder("<")
        shape = tuple(int(d) for d in doc["shape"])
        raw = base64.b64decode(doc["data"], validate=True)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyError(f"{where}: malformed tensor ({exc})") from None


# -- model references ------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ModelRef:
    """One version of one model. Refs sort by name, then by version."""

    name: str
    version: int

    def __post_init__(self) -> None:
        check_name(self.name)
        check_version(self.version)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, doc: Any) -> ModelRef:
        """Inverse of :meth:`to_dict`; raises ValueError on anything else."""
        if not isinstance(doc, dict):
            raise ValueError(f"expected {{'name': ..., 'version': ...}}, got {doc!r}")
        return cls(doc.get("name"), doc.get("version"))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``name@version``; raises ValueError."""
        name, sep, version = text.rpartition("@")
        if not sep or not version.isdigit():
            raise ValueError(f"expected name@version, got {text!r}")
        return cls(name, int(version))


# -- manifest -------------------------------------------------------------------------


@dataclass
class SmokeTest:
    """A tiny input with the output the model must reproduce on the device."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    atol: float = 1e-3
    rtol: float = 1e-2
    max_latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": {k: encode_tensor(v) for k, v in self.inputs.items()},
            "outputs": {k: encode_tensor(v) for k, v in self.outputs.items()},
            "atol": self.atol,
            "rtol": self.rtol,
            "max_latency_ms": self.max_latency_ms,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SmokeTest:
        try:
            smoke = cls(
                inputs={k: decode_tensor(v, f"smoke.inputs.{k}") for k, v in doc["inputs"].items()},
                outputs={
                    k: decode_tensor(v, f"smoke.outputs.{k}") for k, v in doc["outputs"].items()
                },
                atol=float(doc.get("atol", 1e-3)),
                rtol=float(doc.get("rtol", 1e-2)),
                max_latency_ms=doc.get("max_latency_ms"),
            )
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise VerifyError(f"manifest smoke test is malformed: {exc}") from None
        for key in ("atol", "rtol"):
            if not (finite(getattr(smoke, key)) and getattr(smoke, key) >= 0):
                raise VerifyError(f"manifest smoke test is malformed: {key} must be >= 0")
        latency = smoke.max_latency_ms
        if latency is not None and not (finite(latency) and latency > 0):
            raise VerifyError(
                "manifest smoke test is malformed: max_latency_ms must be a positive number or null"
            )
        return smoke


@dataclass
class Manifest:
    """What a device needs to fetch, verify and smoke-test one model version."""

    name: str
    version: int
    sha256: str
    size: int
    chunk_size: int
    chunks: list[str]  # sha256 of each chunk, in order
    io: dict[str, Any]  # {"inputs": [{"name","dtype","shape"}], "outputs": [...]}
    opset: int
    key_id: str
    created: float
    expires: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    smoke: SmokeTest | None = None
    schema: int = SCHEMA_VERSION

    @property
    def chunk_count(self) -> int:
        return len(self.chunks)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["kind"] = "manifest"
        doc["smoke"] = self.smoke.to_dict() if self.smoke else None
        return doc

    @classmethod
    def from_dict(cls, doc: Any) -> Manifest:
        """Validate a decoded manifest; any problem is a VerifyError naming the field."""
        if not isinstance(doc, dict) or doc.get("kind") != "manifest":
            raise VerifyError("not a manifest document")
        if doc.get("schema") != SCHEMA_VERSION:
            raise VerifyError(f"unsupported manifest schema {doc.get('schema')!r}")
        expect = {
            "name": str,
            "version": int,
            "sha256": str,
            "size": int,
            "chunk_size": int,
            "chunks": list,
            "io": dict,
            "opset": int,
            "key_id": str,
            "created": (int, float),
        }
        for key, kind in expect.items():
            if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
                raise VerifyError(f"manifest field {key!r} is missing or has the wrong type")
        if not finite(doc["created"]):
            raise VerifyError("manifest field 'created' must be a finite number")
        if doc.get("expires") is not None and not finite(doc["expires"]):
            raise VerifyError("manifest field 'expires' must be a finite number or null")
        if not _SHA256.fullmatch(doc["sha256"]):
            raise VerifyError("manifest field 'sha256' must be 64 lowercase hex digits")
        for i, chunk in enumerate(doc["chunks"]):
            if not isinstance(chunk, str) or not _SHA256.fullmatch(chunk):
                raise VerifyError(f"manifest field 'chunks[{i}]' must be 64 lowercase hex digits")
        if not isinstance(doc.get("report", {}), dict):
            raise VerifyError("manifest field 'report' must be a mapping")
        if not 1 <= doc["version"] <= MAX_VERSION or doc["size"] < 0 or doc["chunk_size"] < 1:
            raise VerifyError("manifest version, size or chunk_size out of range")
        expected_chunks = max(1, -(-doc["size"] // doc["chunk_size"]))
        if len(doc["chunks"]) != expected_chunks:
            raise VerifyError(
                f"manifest lists {len(doc['chunks'])} chunks, size implies {expected_chunks}"
            )
        smoke = SmokeTest.from_dict(doc["smoke"]) if doc.get("smoke") else None
        return cls(
            name=doc["name"],
            version=doc["version"],
            sha256=doc["sha256"],
            size=doc["size"],
            chunk_size=doc["chunk_size"],
            chunks=list(doc["chunks"]),
            io=doc["io"],
            opset=doc["opset"],
            key_id=doc["key_id"],
            created=float(doc["created"]),
            expires=float(doc["expires"]) if doc.get("expires") is not None else None,
            report=doc.get("report", {}),
            smoke=smoke,
        )

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now if now is not None else time.time()) > self.expires


def make_manifest(
    name: str,
    version: int,
    data: bytes,
    *,
    io: dict[str, Any],
    opset: int,
    key_id: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    report: dict[str, Any] | None = None,
    smoke: SmokeTest | None = None,
    ttl_s: float | None = None,
    created: float | None = None,
) -> tuple[Manifest, list[bytes]]:
    """Build the manifest for ``data`` and return it with the chunks it describes."""
    check_name(name)
    chunks = split_chunks(data, chunk_size)
    created = time.time() if created is None else created
    manifest = Manifest(
        name=name,
        version=version,
        sha256=sha256_hex(data),
        size=len(data),
        chunk_size=chunk_size,
        chunks=[sha256_hex(c) for c in chunks],
        io=io,
        opset=opset,
        key_id=key_id,
        created=created,
        expires=created + ttl_s if ttl_s else None,
        report=report or {},
        smoke=smoke,
    )
    return manifest, chunks


def loads_json(payload: bytes | str) -> Any:
    """``json.loads`` for bytes from outside this process (broker, network, files):
    nesting deep enough to make the parser recurse past Python's limit is a ValueError
    like any other malformed JSON, not a RecursionError that escapes the caller's checks;
    bytes that are not UTF-8 are a ValueError too (UnicodeDecodeError). NaN and Infinity
    are read (reports may hold them); a signed document holding one has no canonical form
    and is refused by :func:`~slimfleet.agent.signing.check_signature`."""
    try:
        return json.loads(payload.decode("utf-8") if isinstance(payload, bytes) else payload)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def parse_json(payload: bytes, what: str) -> Any:
    """Decode a JSON body; a malformed one is a VerifyError saying what it was."""
    try:
        return loads_json(payload)
    except ValueError as exc:
        raise VerifyError(f"{what}: not valid JSON ({exc})") from None


# -- what agents report (schema 2) ------------------------------------------------------
#
# devices/<id>/state (retained, JSON), published on every change:
#   {"schema": 2, "device": "cam-01", "ts": <unix s>, "started": <unix s of agent start>,
#    "status": "idle" | "updating" | "serving" | "stale" | "failed",
#    "deployment": {slot: [{"name", "version"}, ...tiers loaded]},   # what serves now
#    "last_good": {slot: [...]} | null,     # the deployment that last passed its watch
#    "previous": {slot: [...]} | null,      # the one before the current
#    "desired": {"seq": int, "issued": s, "expires": s, "rollback": bool,
#                "deployment": {slot: [...refs]},
#                "outcome": "pending" | "serving" | "refused" | "stale",
#                "stage": str | null, "reason": str | null} | null,   # the last desired seen
#    "floor": int,                           # highest seq accepted (replay floor)
#    "serving_revoked": [{"slot", "name", "version", "key_id"}]}  # served although their
#                       # signing key is revoked (no other deployment verifies); else []
#   "outcome" tells the host what became of that desired state: "serving" when the
#   device serves exactly it, "refused" with the stage (verify, download, install, load,
#   smoke_test, watch, expired, replay, skew, revoked, integrity) and a one-line reason.
#
# devices/<id>/telemetry (not retained, JSON), every telemetry interval:
#   {"schema": 2, "device": ..., "ts": ..., "started": ..., "uptime_s": ..., "interval_s": ...,
#    "rss_bytes": int, "cpu_percent": float,
#    "slots": {slot: {"model": {"name", "version"} | null,       # the slot's first tier
#                     "requests": int, "errors": int,             # model failures only
#                     "client_errors": int,                       # 4xx, never the model's
#                     "escalations": int,                         # requests a later tier answered
#                     "throughput_rps": float,
#                     "latency_ms": {"p50", "p95", "p99"} | null,
#                     "tiers": {"<name@version>" | "remote": {"runs": int,
#                               "latency_ms": {"p50", "p95"} | null}}}}}
#
# devices/<id>/events (not retained, JSON), one per event:
#   {"type": <EVENT_*>, "ts": ..., "device": ..., "slot": str | null,
#    "model": {"name", "version"} | null, "seq": int | null, ...type-specific fields,
#    "reason": str (on failures)}

EVENT_DESIRED_REFUSED = "desired_refused"  # replay, skew, schema, signature: stage + reason
EVENT_DESIRED_STALE = "desired_stale"  # the desired state expired: still serving last good
EVENT_INTEGRITY_FAILED = "integrity_failed"  # a stored model no longer matches its manifest
EVENT_MESSAGE_DROPPED = "message_dropped"  # over a per-topic size limit or a full queue
EVENT_KEY_REVOKED = "key_revoked"  # a model's signing key was revoked: fell back
EVENT_TIER_SKIPPED = "tier_skipped"  # a chain tier failed to load; the slot serves without it
EVENT_TIER_FAILING = "tier_failing"  # a tier (local or remote) failed or timed out
EVENT_TIER_RECOVERED = "tier_recovered"  # a remote tier's circuit breaker closed again

# Every event type an agent publishes on devices/<id>/events.
EVENT_TYPES = (
    EVENT_DOWNLOAD_PROGRESS,
    EVENT_VERIFY_FAILED,
    EVENT_SWAP_STARTED,
    EVENT_SWAP_OK,
    EVENT_SWAP_FAILED,
    EVENT_FALLBACK,
    EVENT_DESIRED_REFUSED,
    EVENT_DESIRED_STALE,
    EVENT_INTEGRITY_FAILED,
    EVENT_MESSAGE_DROPPED,
    EVENT_KEY_REVOKED,
    EVENT_TIER_SKIPPED,
    EVENT_TIER_FAILING,
    EVENT_TIER_RECOVERED,
)
