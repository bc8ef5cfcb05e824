"""Publishing to the fleet: signed model manifests with their chunks, and desired state.

Everything is published retained with QoS 1, so a device that is offline now fetches it
when it returns, even if the host is gone. Chunks go first and the manifest last: a
manifest on the broker means its chunks are there too. Versions are immutable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.signing import Signer, Verifier
from slimfleet.agent.wire import (
    DEFAULT_CHUNK_SIZE,
    MAX_PAYLOAD_BYTES,
    Manifest,
    check_name,
    make_manifest,
    parse_json,
)
from slimfleet.agent.wire import (
    check_version as check_wire_version,
)
from slimfleet.host.fleet.artifact import load_artifact, make_smoke
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.mqttio import BrokerLink, Progress
from slimfleet.host.fleet.verify import repair_published

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    """What ``publish`` did; ``published`` is False when the version was already there."""

    name: str
    version: int
    sha256: str
    size: int
    chunk_size: int
    chunks: int
    key_id: str
    manifest_topic: str
    manifest_bytes: int
    published: bool
    warnings: list[str] = field(default_factory=list)
    repaired: dict[str, Any] | None = None  # with repair: what was re-sent

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_version(version: object) -> int:
    """``version`` as :func:`~slimfleet.agent.wire.check_version` allows it, else an
    InputError."""
    try:
        return check_wire_version(version)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _check_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def build_manifest(
    signer: Signer,
    source: str | Path,
    name: str,
    version: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ttl_s: float | None = None,
    max_latency_ms: float | None = None,
) -> tuple[Manifest, list[bytes]]:
    """The unsigned manifest and chunks for an OUTDIR or .onnx file (no network)."""
    _check_name(name)
    check_version(version)
    if not 0 < chunk_size <= MAX_PAYLOAD_BYTES:
        raise InputError(f"chunk size must be between 1 and {MAX_PAYLOAD_BYTES} bytes")
    if ttl_s is not None and not (math.isfinite(ttl_s) and ttl_s > 0):
        raise InputError(f"ttl must be a positive finite number of seconds, got {ttl_s}")
    if max_latency_ms is not None and not (math.isfinite(max_latency_ms) and max_latency_ms > 0):
        raise InputError(f"max latency must be a positive finite number, got {max_latency_ms}")
    artifact = load_artifact(source)
    return make_manifest(
        name,
        version,
        artifact.data,
        io=artifact.io,
        opset=artifact.opset,
        key_id=signer.key_id,
        chunk_size=chunk_size,
        report=artifact.report,
        smoke=make_smoke(artifact, max_latency_ms),
        ttl_s=ttl_s,
    )


def _sign_within_limit(signer: Signer, manifest: Manifest, warnings: list[str]) -> bytes:
    """Sign; a manifest over the packet limit loses its smoke sample (with a warning)."""
    envelope = signer.sign(manifest.to_dict())
    if len(envelope) > MAX_PAYLOAD_BYTES and manifest.smoke is not None:
        message = (
            f"the smoke-test sample makes the manifest {len(envelope)} bytes "
            f"(limit {MAX_PAYLOAD_BYTES}); publishing without a smoke test"
        )
        log.warning(message)
        warnings.append(message)
        manifest.smoke = None
        envelope = signer.sign(manifest.to_dict())
    if len(envelope) > MAX_PAYLOAD_BYTES:
        raise InputError(
            f"the manifest of {manifest.name}@{manifest.version} is {len(envelope)} bytes, "
            f"over the {MAX_PAYLOAD_BYTES}-byte packet limit: use a larger chunk size"
        )
    return envelope


def read_published(
    link: BrokerLink,
    fleet: FleetConfig,
    name: str,
    version: int,
    verifier: Verifier | None = None,
) -> Manifest | None:
    """The retained manifest of name@version, or None when it is not published.

    With a ``verifier`` the signature must check out (VerifyError otherwise).
    """
    topic = fleet.topics.manifest(name, version)
    payload = link.read_retained([topic]).get(topic)
    if payload is None:
        return None
    if verifier is not None:
        return Manifest.from_dict(verifier.verify(payload, topic))
    envelope = parse_json(payload, topic)
    if not isinstance(envelope, dict):
        raise VerifyError(f"{topic}: not a signed envelope")
    return Manifest.from_dict(envelope.get("signed"))


def publish_manifest(
    fleet: FleetConfig,
    manifest: Manifest,
    chunks: list[bytes],
    *,
    signer: Signer | None = None,
    progress: Progress | None = None,
    repair: bool = False,
) -> PublishResult:
    """Sign ``manifest`` and publish its chunks, then the manifest, retained with QoS 1.

    A no-op when the same bytes (sha256) are already published under that version;
    an InputError when different bytes are. With ``repair``, every retained chunk and
    the manifest's signature are checked and whatever is missing or wrong is re-sent
    (see :func:`~slimfleet.host.fleet.verify.repair_published`).
    """
    signer = signer or fleet.signer()
    warnings: list[str] = []
    envelope = _sign_within_limit(signer, manifest, warnings)
    topics = fleet.topics
    result = PublishResult(
        name=manifest.name,
        version=manifest.version,
        sha256=manifest.sha256,
        size=manifest.size,
        chunk_size=manifest.chunk_size,
        chunks=manifest.chunk_count,
        key_id=manifest.key_id,
        manifest_topic=topics.manifest(manifest.name, manifest.version),
        manifest_bytes=len(envelope),
        published=True,
        warnings=warnings,
    )
    with BrokerLink(fleet.broker) as link:
        if repair:
            fixed = repair_published(link, fleet, manifest, chunks, envelope, progress)
            result.repaired, result.published = fixed.to_dict(), fixed.manifest
            return result
        existing = read_published(link, fleet, manifest.name, manifest.version)
        if existing is not None:
            if existing.sha256 != manifest.sha256:
                raise InputError(
                    f"version {manifest.version} of {manifest.name} is already published with "
                    "different content; versions are immutable"
                )
            log.info(
                "%s@%s is already published (unchecked: 'slimfleet verify' checks it)",
                manifest.name,
                manifest.version,
            )
            result.published = False
            result.chunk_size, result.chunks = existing.chunk_size, existing.chunk_count
            return result
        messages = [
            (topics.chunk(manifest.name, manifest.version, i), chunk)
            for i, chunk in enumerate(chunks)
        ]
        link.publish_all(messages, progress=progress, confirm=False)
        link.publish_all([(result.manifest_topic, envelope)])
    return result


def publish_model(
    fleet: FleetConfig,
    source: str | Path,
    name: str,
    version: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ttl_s: float | None = None,
    max_latency_ms: float | None = None,
    progress: Progress | None = None,
    repair: bool = False,
) -> PublishResult:
    """Sign and publish an OUTDIR or .onnx file as ``name`` version ``version``.

    ``progress(done, total)`` is called as each chunk is acknowledged by the broker.
    ``repair`` re-sends what the broker lacks or holds wrong for an existing version.
    """
    signer = fleet.signer()
    manifest, chunks = build_manifest(
        signer,
        source,
        name,
        version,
        chunk_size=chunk_size,
        ttl_s=ttl_s,
        max_latency_ms=max_latency_ms,
    )
    return publish_manifest(
        fleet, manifest, chunks, signer=signer, progress=progress, repair=repair
    )
