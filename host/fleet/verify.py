"""What the broker holds for a model version, checked; and the repair that re-sends the rest.

``verify_published`` reads the retained manifest and every chunk of NAME@VERSION and
checks the manifest's signature against the fleet's public key, each chunk against the
manifest's hash, the whole against its sha256 and, if given, against a local file.
``repair_published`` re-sends exactly the chunks that are missing or wrong, and the
manifest when it is missing or its signature fails.

Memory bound: chunks are read ``CHUNK_WINDOW`` at a time, so at most
``CHUNK_WINDOW x chunk_size`` bytes (16 x 256 KiB by default, 16 x 2 MB at most) are
held besides the local file being compared.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.wire import Manifest, split_chunks
from slimfleet.host.fleet.artifact import load_artifact
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.mqttio import BrokerLink, Progress

log = logging.getLogger(__name__)

CHUNK_WINDOW = 16
MISSING, WRONG = "missing", "wrong bytes"


@dataclass
class BrokerCopy:
    """The broker's copy of one version: its manifest (None if missing or not valid),
    why the manifest is not valid, and the chunks that do not match their hash."""

    manifest: Manifest | None
    manifest_problem: str | None
    bad_chunks: dict[int, str] = field(default_factory=dict)


@dataclass
class VerifyReport:
    name: str
    version: int
    manifest_problem: str | None
    chunks: int = 0
    bad_chunks: dict[int, str] = field(default_factory=dict)
    whole_problem: str | None = None
    local_problem: str | None = None

    @property
    def problems(self) -> list[str]:
        out = [f"manifest: {self.manifest_problem}"] if self.manifest_problem else []
        out += [f"chunk {i}: {why}" for i, why in sorted(self.bad_chunks.items())]
        out += [p for p in (self.whole_problem, self.local_problem) if p]
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "ok": self.ok,
            "chunks": self.chunks,
            "bad_chunks": {str(i): why for i, why in sorted(self.bad_chunks.items())},
            "problems": self.problems,
        }


def read_manifest(link: BrokerLink, fleet: FleetConfig, name: str, version: int) -> BrokerCopy:
    """The retained manifest, checked against the fleet's public key."""
    topic = fleet.topics.manifest(name, version)
    payload = link.read_retained([topic]).get(topic)
    if payload is None:
        return BrokerCopy(None, MISSING)
    try:
        manifest = Manifest.from_dict(fleet.verifier().verify(payload, topic))
    except VerifyError as exc:
        return BrokerCopy(None, f"does not verify ({exc})")
    if (manifest.name, manifest.version) != (name, version):
        return BrokerCopy(None, f"is signed for {manifest.name}@{manifest.version}")
    return BrokerCopy(manifest, None)


def check_chunks(
    link: BrokerLink, fleet: FleetConfig, manifest: Manifest, whole: Any = None
) -> dict[int, str]:
    """index -> problem for each retained chunk that is missing or does not match its
    hash in ``manifest``; feeds the good chunks, in order, to ``whole.update``."""
    bad: dict[int, str] = {}
    topics = fleet.topics
    for start in range(0, manifest.chunk_count, CHUNK_WINDOW):
        indices = range(start, min(start + CHUNK_WINDOW, manifest.chunk_count))
        wanted = {topics.chunk(manifest.name, manifest.version, i): i for i in indices}
        got = link.read_retained(list(wanted))
        for topic, i in wanted.items():
            payload = got.get(topic)
            if payload is None:
                bad[i] = MISSING
            elif hashlib.sha256(payload).hexdigest() != manifest.chunks[i]:
                bad[i] = (
                    f"{WRONG} ({len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()[:16]})"
                )
            elif whole is not None:
                whole.update(payload)
    return bad


def verify_published(
    fleet: FleetConfig, name: str, version: int, local: str | Path | None = None
) -> VerifyReport:
    """Check the broker's copy of name@version (and ``local``, an OUTDIR or .onnx)."""
    data = load_artifact(local).data if local is not None else None
    with BrokerLink(fleet.broker) as link:
        copy = read_manifest(link, fleet, name, version)
        report = VerifyReport(name, version, copy.manifest_problem)
        manifest = copy.manifest
        if manifest is None:
            return report
        whole = hashlib.sha256()
        report.chunks = manifest.chunk_count
        report.bad_chunks = check_chunks(link, fleet, manifest, whole)
    if not report.bad_chunks and whole.hexdigest() != manifest.sha256:
        report.whole_problem = "the chunks match their hashes but not the model's sha256"
    if data is not None and hashlib.sha256(data).hexdigest() != manifest.sha256:
        report.local_problem = f"{local} is not the published model (its sha256 differs)"
    return report


@dataclass
class Repair:
    """What ``repair_published`` re-sent."""

    chunks: list[int]
    manifest: bool

    def to_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "manifest": self.manifest}


def repair_published(
    link: BrokerLink,
    fleet: FleetConfig,
    manifest: Manifest,
    chunks: list[bytes],
    envelope: bytes,
    progress: Progress | None = None,
) -> Repair:
    """Re-send what the broker lacks or holds wrong for ``manifest`` (built from the
    local file, ``envelope`` its signed form).

    A valid published manifest is kept (devices may already hold it) and its chunks are
    checked; a missing or invalid one is replaced by ``envelope`` after its chunks.
    InputError when a valid published manifest describes different bytes.
    """
    copy = read_manifest(link, fleet, manifest.name, manifest.version)
    truth = copy.manifest or manifest
    if truth.sha256 != manifest.sha256:
        raise InputError(
            f"version {manifest.version} of {manifest.name} is already published with "
            "different content; versions are immutable"
        )
    if truth.chunk_size != manifest.chunk_size:
        chunks = split_chunks(b"".join(chunks), truth.chunk_size)
    bad = check_chunks(link, fleet, truth)
    topics = fleet.topics
    messages = [(topics.chunk(truth.name, truth.version, i), chunks[i]) for i in sorted(bad)]
    for i, why in sorted(bad.items()):
        log.warning("%s@%s chunk %d: %s: re-sending", truth.name, truth.version, i, why)
    if messages:
        link.publish_all(messages, progress=progress)
    if copy.manifest is None:
        log.warning(
            "%s@%s manifest %s: re-sending", truth.name, truth.version, copy.manifest_problem
        )
        link.publish_all([(topics.manifest(truth.name, truth.version), envelope)])
    return Repair(sorted(bad), copy.manifest is None)
