"""The update flow up to activation: desired state -> manifests -> download -> install.

:meth:`Updater.prepare` makes every model of a deployment available on disk, verified:
a stored version is re-checked (its signed manifest, and its file re-hashed against
it: integrity at rest); a missing one has its retained manifest fetched and checked
(signature, name/version, expiry, size), its chunks downloaded (resumable) and is
installed. It returns each model's file and smoke test for
:meth:`slimfleet.agent.serving.DeploymentServer.activate`.

A stored version whose file no longer matches its manifest is quarantined
(:meth:`ModelStore.quarantine`, event ``integrity_failed``) and fetched again.
Failures raise :class:`UpdateFailed` with the stage of the wire format (``verify``,
``download``, ``install``) and whether a retry can help; :class:`Superseded` when
``cancel`` was set (a newer desired state arrived).
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimfleet.agent.config import AgentConfig
from slimfleet.agent.deployment import Deployment, DesiredState
from slimfleet.agent.download import ChunkDownload, DownloadCancelled, DownloadError, clear_partials
from slimfleet.agent.errors import KeyRevoked, SlimfleetError, VerifyError
from slimfleet.agent.inbox import MANIFEST_LIMIT
from slimfleet.agent.keyring import KeyRing
from slimfleet.agent.link import Backoff, Link
from slimfleet.agent.serving import ModelSource
from slimfleet.agent.signing import open_envelope
from slimfleet.agent.store import ModelStore
from slimfleet.agent.wire import (
    EVENT_DOWNLOAD_PROGRESS,
    EVENT_INTEGRITY_FAILED,
    EVENT_VERIFY_FAILED,
    Manifest,
    ModelRef,
)

log = logging.getLogger(__name__)

STAGE_VERIFY = "verify"
STAGE_DOWNLOAD = "download"
STAGE_INSTALL = "install"
STAGE_INTEGRITY = "integrity"

Emit = Callable[..., None]  # emit(event_type, slot=None, model=ref|None, **fields)


@dataclass(frozen=True)
class Timing:
    """How patient the agent is; the defaults suit a real fleet, tests shorten them."""

    manifest_timeout_s: float = 60.0  # wait for a retained manifest (while connected)
    chunk_timeout_s: float = 60.0  # wait for the next chunk (while connected)
    # retry: after a transient failure (download, manifest); link: between reconnects
    retry: Backoff = field(default_factory=lambda: Backoff(initial_s=5.0, max_s=300.0))
    link: Backoff = field(default_factory=Backoff)


class UpdateFailed(SlimfleetError):
    """Reaching a desired state failed at ``stage``; ``permanent`` ones are not retried."""

    def __init__(self, stage: str, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.permanent = permanent


class Superseded(Exception):
    """A newer desired state arrived while this one was being prepared."""


def check_order(desired: DesiredState, before: Deployment) -> None:
    """Refuse a slot's first tier older than what the slot ran ``before`` (the last good
    deployment), unless the desired state is a signed rollback. A pure policy."""
    for slot, spec in sorted(desired.deployment.items()):
        old = before.get(slot)
        new = spec.primary
        if old is None or old.primary.name != new.name:
            continue
        if new.version < old.primary.version and not desired.rollback:
            raise UpdateFailed(
                STAGE_VERIFY,
                f"slot {slot}: {new} is older than the last good {old.primary} and the "
                "desired state is not a signed rollback",
                permanent=True,
            )


class Updater:
    """Fetches, verifies and installs the models of a desired state (one at a time)."""

    def __init__(
        self,
        config: AgentConfig,
        timing: Timing,
        link: Link,
        store: ModelStore,
        verifier: KeyRing,
        emit: Emit,
        cancel: threading.Event,
    ) -> None:
        self.config = config
        self.timing = timing
        self.link = link
        self.store = store
        self.verifier = verifier
        self.emit = emit
        self.cancel = cancel

    def prepare(self, desired: DesiredState) -> tuple[dict[ModelRef, ModelSource], dict[str, Any]]:
        """Every model of ``desired`` installed and verified, and the update's figures:
        ``{"download_s", "install_s", "bytes", "resumed_chunks", "downloaded"}``."""
        figures: dict[str, Any] = {
            "download_s": 0.0,
            "install_s": 0.0,
            "bytes": 0,
            "resumed_chunks": 0,
            "downloaded": [],
        }
        sources = {}
        for ref in desired.refs():
            source = self.stored(ref, seq=desired.seq)
            if source is None:
                source = self._fetch(ref, desired.seq, figures)
            sources[ref] = source
        return sources, figures

    def installed(self, deployment: Deployment) -> dict[ModelRef, ModelSource]:
        """Each installed model of ``deployment``, re-verified (failing ones quarantined)."""
        sources = {}
        for spec in deployment.values():
            for ref in spec.models:
                source = self.stored(ref)
                if source is not None:
                    sources[ref] = source
        return sources

    def stored(self, ref: ModelRef, *, seq: int | None = None) -> ModelSource | None:
        """The installed ``ref`` re-verified, or None when it is not (or no longer) there.

        Its manifest's expiry, and its signing key's certificate's, are not checked (it
        was valid when installed, and a signed rollback to it must work after its TTL). A
        model signed by a revoked key is not available (it stays stored, unserved); a
        manifest that no longer verifies otherwise (keys changed) or a file that no longer
        matches it is quarantined.
        """
        if not self.store.has(ref):
            return None
        where = str(self.store.manifest_path(ref))
        try:
            manifest = self._check(self.store.read_manifest(ref), ref, where, installed=True)
        except SlimfleetError as exc:  # UpdateFailed, or the manifest file is unreadable
            if self.revoked_key(ref) is not None:
                log.warning("%s is not served: %s", ref, exc)
                return None
            self._quarantine(ref, seq, f"its stored manifest no longer verifies: {exc}")
            return None
        mismatch = self.store.check_file(ref, manifest.sha256, manifest.size)
        if mismatch is not None:
            self._quarantine(ref, seq, mismatch)
            return None
        return ModelSource(self.store.model_path(ref), manifest.smoke)

    def revoked_key(self, ref: ModelRef) -> str | None:
        """The revoked key that signed the stored manifest of ``ref``, else None (also
        when ``ref`` is not stored or its manifest cannot be read)."""
        try:
            document, _, _ = open_envelope(self.store.read_manifest(ref), str(ref))
        except SlimfleetError:  # VerifyError (not an envelope) or an unreadable file
            return None
        kid = document.get("key_id")
        return kid if isinstance(kid, str) and self.verifier.is_revoked(kid) else None

    def _quarantine(self, ref: ModelRef, seq: int | None, reason: str) -> None:
        log.error("%s: %s", ref, reason)
        try:
            self.store.quarantine(ref)
        except OSError as exc:  # cannot move it: at least never serve it
            log.error("%s: cannot quarantine (%s); removing it", ref, exc)
            self.store.remove(ref)
        self.emit(EVENT_INTEGRITY_FAILED, model=ref, seq=seq, stage=STAGE_INTEGRITY, reason=reason)

    def _fetch(self, ref: ModelRef, seq: int, figures: dict[str, Any]) -> ModelSource:
        envelope = self._fetch_manifest(ref)
        manifest = self._check(envelope, ref, self.config.topics.manifest(ref.name, ref.version))
        download = self._download(manifest, seq)
        installing = time.monotonic()
        try:
            path = self.store.install(ref, download.partial.data_path, envelope)
        except SlimfleetError as exc:  # the download is kept: the retry installs it again
            raise UpdateFailed(STAGE_INSTALL, str(exc)) from None
        clear_partials(self.store.partial_dir())
        figures["download_s"] += round(download.seconds, 4)
        figures["install_s"] += round(time.monotonic() - installing, 4)
        figures["bytes"] += manifest.size
        figures["resumed_chunks"] += download.resumed
        figures["downloaded"].append(ref.to_dict())
        return ModelSource(path, manifest.smoke)

    def _fetch_manifest(self, ref: ModelRef) -> bytes:
        """The retained manifest envelope of ``ref``."""
        topic = self.config.topics.manifest(ref.name, ref.version)
        waited, last = 0.0, time.monotonic()
        with self.link.subscribe([topic], max_bytes=MANIFEST_LIMIT) as sub:
            while True:
                message = sub.get(timeout=0.25)
                if message is not None and message.topic == topic and message.payload:
                    return message.payload
                if self.cancel.is_set():
                    raise Superseded()
                now = time.monotonic()
                if self.link.connected:  # a broker outage does not count
                    waited += now - last
                last = now
                if waited > self.timing.manifest_timeout_s:
                    raise UpdateFailed(
                        STAGE_DOWNLOAD,
                        f"no manifest on {topic} after {self.timing.manifest_timeout_s:g}s",
                    )

    def _check(
        self, envelope: bytes, ref: ModelRef, where: str, *, installed: bool = False
    ) -> Manifest:
        """Verify ``envelope`` describes ``ref``; a fetched one must not have expired (nor its
        key's certificate); an ``installed`` one is re-checked with ``allow_expired``.

        A fetched manifest that does not verify or names another model is retried, like a
        bad chunk: the broker's copy is a mirror anyone with write access can spoil and
        ``publish --repair`` mends, so it must not end the desired state for good. One
        signed by a revoked key is final."""
        try:
            document = self.verifier.verify(envelope, where, allow_expired=installed)
            manifest = Manifest.from_dict(document)
        except KeyRevoked as exc:
            raise UpdateFailed(STAGE_VERIFY, str(exc), permanent=True) from None
        except VerifyError as exc:
            raise UpdateFailed(STAGE_VERIFY, str(exc), permanent=installed) from None
        if (manifest.name, manifest.version) != (ref.name, ref.version):
            raise UpdateFailed(
                STAGE_VERIFY,
                f"{where}: describes {manifest.name}@{manifest.version}, not {ref}",
                permanent=installed,
            )
        if not installed and manifest.expired():  # published versions never change: final
            raise UpdateFailed(
                STAGE_VERIFY,
                f"{ref}: the manifest expired at {time.ctime(manifest.expires)}",
                permanent=True,
            )
        if manifest.size > self.config.max_model_bytes:
            raise UpdateFailed(
                STAGE_VERIFY,
                f"{ref} is {manifest.size} bytes, over this device's limit of "
                f"{self.config.max_model_bytes}",
                permanent=True,
            )
        return manifest

    def _space(self, exc: Exception, ref: ModelRef, size: int) -> UpdateFailed:
        """Why a download failed. A full disk says how much the model needs and is free,
        and is final when the model is larger than the whole disk (no retry could fit it);
        otherwise the retries wait for room."""
        if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            return UpdateFailed(STAGE_DOWNLOAD, str(exc))
        try:
            usage = shutil.disk_usage(self.store.partial_dir())
        except OSError:
            usage = None
        if usage is not None and size > usage.total:
            return UpdateFailed(
                STAGE_DOWNLOAD,
                f"{ref} needs {size} bytes, more than the store's whole disk ({usage.total} bytes)",
                permanent=True,
            )
        free = f"{usage.free} bytes free" if usage is not None else "free space unknown"
        return UpdateFailed(
            STAGE_DOWNLOAD, f"the store's disk is full: {ref} needs {size} bytes, {free}"
        )

    def _download(self, manifest: Manifest, seq: int) -> ChunkDownload:
        """Fetch and verify the model file (``download.partial.data_path``)."""
        ref = ModelRef(manifest.name, manifest.version)

        def progress(download: ChunkDownload) -> None:
            self.emit(
                EVENT_DOWNLOAD_PROGRESS,
                model=ref,
                seq=seq,
                done_chunks=download.done_count,
                resumed_chunks=download.resumed,
                total_chunks=download.total,
                bytes=download.bytes_done,
                total_bytes=manifest.size,
                percent=round(100 * download.done_count / download.total, 1),
            )

        download = ChunkDownload(
            self.link,
            self.config.topics,
            manifest,
            self.store.partial_dir(),
            max_bytes=self.config.max_model_bytes,
            chunk_timeout_s=self.timing.chunk_timeout_s,
            on_progress=progress,
            cancel=self.cancel,
        )
        try:
            download.run()
        except DownloadCancelled:
            raise Superseded() from None
        except VerifyError as exc:  # a bad chunk: refused now, the retry fetches it again
            self.emit(
                EVENT_VERIFY_FAILED, model=ref, seq=seq, stage=STAGE_DOWNLOAD, reason=str(exc)
            )
            raise UpdateFailed(STAGE_DOWNLOAD, str(exc)) from None
        except (DownloadError, OSError) as exc:
            raise self._space(exc, ref, manifest.size) from None
        log.info(
            "downloaded %s: %d bytes in %.2fs (%d chunks resumed)",
            ref,
            manifest.size,
            download.seconds,
            download.resumed,
        )
        return download
