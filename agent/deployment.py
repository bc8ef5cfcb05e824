"""The signed desired state of one device: a deployment of named slots (schema 2).

A contract module shared by the host (assign, rollout, reissue write it) and the agent
(which verifies and applies it); it imports only other contracts.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from slimfleet.agent.errors import VerifyError
from slimfleet.agent.wire import MAX_SAFE_INT, ModelRef, finite, host_port

# -- desired state, schema 2: a deployment of named slots ------------------------------
#
# This is the contract between the host (assign, rollout, reissue) and the agent.
#
# Body of the signed envelope on devices/<id>/desired::
#
#   {"kind": "desired", "schema": 2, "device": "cam-01", "key_id": "<signing key id>",
#    "seq": 17,                  # per-device sequence, +1 on every desired state issued
#    "issued": 1765000000.0,     # host clock, unix seconds
#    "expires": 1765604800.0,    # after this the device keeps serving but reports stale
#    "rollback": false,          # permits versions older than what the slot ran before
#    "deployment": {             # slot name -> what the slot runs; {} = serve nothing
#      "det": {"models": [{"name": "ocr-det", "version": 3}]},
#      "rec": {"models": [{"name": "ocr-rec", "version": 5}, {"name": "ocr-rec", "version": 4}],
#              "gate": {"function": "ctc_min_prob", "threshold": 0.81},
#              "remote": {"url": "https://ocr.example/v2/models/rec/infer", "timeout_s": 2.0}}}}
#
# ``models`` are the slot's tiers, first to last (a chain when there are several); a
# request escalates to the next tier when the gate's confidence is below its threshold
# or the tier is not loaded or fails, and to ``remote`` after the last local tier.
#
# Replay rule (agent): a desired state is applied only if its seq is above the highest
# seq the device has accepted (the floor, kept in state.json and desired.json); one whose
# ``issued`` lies more than the agent's max_clock_skew_s in the device's future is refused
# without moving the floor; an expired one is not applied (status "stale").

SCHEMA_VERSION_DESIRED = 2
SLOT_MAIN = "main"  # the slot that ``assign NAME@VERSION`` without --slot sets
MAX_SLOTS = 32
MAX_TIERS = 8
_SLOT = re.compile(r"[a-z0-9_][a-z0-9_-]{0,63}")


def check_slot(name: str) -> str:
    """Slot names become URL path segments (/v2/models/<slot>) and metric labels."""
    if not isinstance(name, str) or _SLOT.fullmatch(name) is None:
        raise ValueError(
            f"invalid slot name {name!r}: use 1 to 64 lowercase letters, digits, '_' or '-', "
            "starting with a letter, digit or '_'"
        )
    return name


def split_http_url(url: str) -> SplitResult:
    """``url`` split, or ValueError unless it is ``http(s)://host[:port]/...`` with a
    host and a port that parse (``http://[::1`` made urlsplit raise deep in the agent)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"expected an http(s) URL, got {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL (http(s)://host[:port]/path), got {url!r}")
    return parts


def http_url(host: str, port: int, path: str = "") -> str:
    """``http://host:port/path``, an IPv6 address in brackets (``http://[::1]:8080``)."""
    return f"http://{host_port(host, port)}{path}"


@dataclass(frozen=True)
class Gate:
    """When a tier's answer is good enough: ``function(outputs) >= threshold``."""

    function: str  # a built-in name (max_prob, ctc_min_prob, ...) or "module:attr"
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {"function": self.function, "threshold": self.threshold}


@dataclass(frozen=True)
class RemoteTier:
    """The user's own server, asked after the last local tier (Open Inference Protocol)."""

    url: str
    timeout_s: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "timeout_s": self.timeout_s}


@dataclass(frozen=True)
class SlotSpec:
    """What one slot runs: its local tiers first to last, a gate, an optional remote."""

    models: tuple[ModelRef, ...]
    gate: Gate | None = None
    remote: RemoteTier | None = None

    @property
    def gate_escalates(self) -> bool:
        """Whether the gate, if any, has somewhere to send an unsure answer: a second
        model or a remote tier (the deployment file refuses a gate without; a device
        serving one simply never escalates)."""
        return self.gate is None or len(self.models) > 1 or self.remote is not None

    @property
    def primary(self) -> ModelRef:
        return self.models[0]

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"models": [m.to_dict() for m in self.models]}
        if self.gate is not None:
            doc["gate"] = self.gate.to_dict()
        if self.remote is not None:
            doc["remote"] = self.remote.to_dict()
        return doc

    @classmethod
    def from_dict(cls, doc: Any, where: str = "slot") -> SlotSpec:
        """Inverse of :meth:`to_dict`; raises VerifyError naming ``where``."""
        if not isinstance(doc, dict):
            raise VerifyError(f"{where}: expected an object with 'models'")
        unknown = set(doc) - {"models", "gate", "remote"}
        if unknown:
            raise VerifyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        models = doc.get("models")
        if not isinstance(models, list) or not 1 <= len(models) <= MAX_TIERS:
            raise VerifyError(f"{where}.models: expected 1 to {MAX_TIERS} models")
        try:
            refs = tuple(ModelRef.from_dict(m) for m in models)
        except ValueError as exc:
            raise VerifyError(f"{where}.models: {exc}") from None
        if len(set(refs)) != len(refs):
            raise VerifyError(f"{where}.models: a model is named twice")
        gate = remote = None
        if doc.get("gate") is not None:
            g = doc["gate"]
            if (
                not isinstance(g, dict)
                or not isinstance(g.get("function"), str)
                or not g["function"]
                or not finite(g.get("threshold"))
            ):
                raise VerifyError(
                    f"{where}.gate: expected {{'function': str, 'threshold': number}}"
                )
            gate = Gate(g["function"], float(g["threshold"]))
        if doc.get("remote") is not None:
            r = doc["remote"]
            url = r.get("url") if isinstance(r, dict) else None
            timeout = r.get("timeout_s", 2.0) if isinstance(r, dict) else None
            if not isinstance(url, str):
                raise VerifyError(f"{where}.remote.url: expected an http(s) URL")
            try:
                split_http_url(url)
            except ValueError as exc:
                raise VerifyError(f"{where}.remote.url: {exc}") from None
            if not (finite(timeout) and 0 < timeout <= 60):
                raise VerifyError(f"{where}.remote.timeout_s: expected a number in (0, 60]")
            remote = RemoteTier(url, float(timeout))
        return cls(refs, gate, remote)


Deployment = dict[str, SlotSpec]


def deployment_to_dict(deployment: Deployment) -> dict[str, Any]:
    return {slot: spec.to_dict() for slot, spec in sorted(deployment.items())}


def deployment_from_dict(doc: Any, where: str = "deployment") -> Deployment:
    """Parse ``{slot: SlotSpec}``; raises VerifyError."""
    if not isinstance(doc, dict) or len(doc) > MAX_SLOTS:
        raise VerifyError(f"{where}: expected an object of at most {MAX_SLOTS} slots")
    deployment = {}
    for slot, spec in doc.items():
        try:
            check_slot(slot)
        except ValueError as exc:
            raise VerifyError(f"{where}: {exc}") from None
        deployment[slot] = SlotSpec.from_dict(spec, f"{where}.{slot}")
    return deployment


@dataclass(frozen=True)
class DesiredState:
    """What the host wants one device to run (schema 2, see the comment above)."""

    device: str
    deployment: Deployment
    key_id: str
    seq: int
    issued: float
    expires: float
    rollback: bool = False

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires

    def refs(self) -> list[ModelRef]:
        """Every model the deployment names, each once, in slot then tier order."""
        seen: dict[ModelRef, None] = {}
        for slot in sorted(self.deployment):
            for ref in self.deployment[slot].models:
                seen.setdefault(ref, None)
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "desired",
            "schema": SCHEMA_VERSION_DESIRED,
            "device": self.device,
            "key_id": self.key_id,
            "seq": self.seq,
            "issued": self.issued,
            "expires": self.expires,
            "rollback": self.rollback,
            "deployment": deployment_to_dict(self.deployment),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> DesiredState:
        """Inverse of :meth:`to_dict`; raises VerifyError with what is wrong."""
        if not isinstance(doc, dict) or doc.get("kind") != "desired":
            raise VerifyError("not a desired-state document")
        if doc.get("schema") != SCHEMA_VERSION_DESIRED:
            raise VerifyError(
                f"desired state has schema {doc.get('schema')!r}; this agent reads "
                f"schema {SCHEMA_VERSION_DESIRED}"
            )
        seq, issued, expires = doc.get("seq"), doc.get("issued"), doc.get("expires")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SAFE_INT:
            raise VerifyError(
                f"desired state is malformed: seq must be an integer from 1 to {MAX_SAFE_INT}"
            )
        if not (finite(issued) and finite(expires) and expires > issued):
            raise VerifyError("desired state is malformed: needs finite issued < expires")
        device, key_id = doc.get("device"), doc.get("key_id")
        if not isinstance(device, str) or not isinstance(key_id, str):
            raise VerifyError("desired state is malformed: device and key_id must be strings")
        return cls(
            device=device,
            deployment=deployment_from_dict(doc.get("deployment")),
            key_id=key_id,
            seq=seq,
            issued=float(issued),
            expires=float(expires),
            rollback=bool(doc.get("rollback", False)),
        )
