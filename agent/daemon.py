"""The edge agent: serve the last good model, follow the desired state, report.

:class:`Agent` is the whole daemon in-process (tests, benchmarks and the demo use it);
``slimfleet-agent --config agent.yaml`` runs one until SIGTERM or SIGINT.

On start it serves the last good model at once (no broker needed), starts the HTTP
API, then connects. It follows its retained, signed desired state: for a model it does
not run it fetches the signed manifest, refuses older versions (unless the desired
state is a signed rollback), expired manifests and oversized models, downloads the
chunks (resumable), installs the file, and lets :class:`Serving` load, smoke-test and
swap it. Any failure leaves the old model serving and is reported as an event.

Published by the agent (``<prefix>/devices/<id>/...``):

``status`` (retained, Last Will)
    ``online`` / ``offline``.
``state`` (retained), :meth:`Agent.state_document`::

    {"device": "cam-01", "ts": 1732380000.0,
     "status": "serving",               # no_model | serving | downloading | activating
     "current":   {"name": "ocr", "version": 3} | null,   # serving now
     "last_good": {"name": "ocr", "version": 2} | null,   # survived its watch window
     "previous":  {"name": "ocr", "version": 2} | null,   # served before current
     "desired":   {"name": "ocr", "version": 3, "rollback": false, "issued": ...} | null,
     "error": {"model": {...}, "stage": "smoke", "reason": "...", "ts": ...} | null,
     "last_update": {...} | null}

``error`` is the last failure to reach ``desired``; it is cleared by a success.
``last_update`` times the last model change: ``{"model", "download_s", "install_s",
"bytes", "resumed_chunks", "load_s", "activate_s" (load + smoke test + swap),
"total_s" (from the manifest seen to the new model serving)}``; the download keys are
0/absent when the model came from the store.
``events`` (QoS 1, not retained): one JSON object per event, always with ``type``,
``ts``, ``device`` and ``model``; swap events are documented in
:mod:`slimfleet.agent.sessions`, the others are::

    {"type": "download_progress", "model", "done_chunks", "resumed_chunks",
     "total_chunks", "bytes", "total_bytes", "percent"}       # every 10 %
    {"type": "verify_failed", "model" (null for a bad desired state), "stage", "reason"}
    {"type": "fallback", "model", "to", "stage", "reason"}    # gave up on "model"

``stage`` of verify_failed is ``desired``, ``manifest``, ``version`` (older than the
last good one), ``expired``, ``size`` or ``download`` (a chunk or the assembled file).
Every failure to reach a desired model (except a bad desired state itself) also emits
one fallback; those emitted here rather than by the swap have the stages above,
``manifest`` or ``download`` when the manifest or chunks did not arrive in time,
``install`` (disk), ``internal`` (a bug), or ``start`` when a stored model could not
be loaded at startup. Transient failures (manifest, download, install, internal)
are retried with backoff; the others wait for a new desired state. An installed
version's manifest is not checked for expiry again, so a signed rollback to it works
after its TTL.
``telemetry`` (QoS 0, every ``telemetry_interval_s``): see :mod:`slimfleet.agent.telemetry`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from slimfleet.agent.cli_runner import run_cli, setup_logging
from slimfleet.agent.config import AgentConfig, load_agent_config
from slimfleet.agent.download import ChunkDownload, DownloadCancelled, DownloadError, clear_partials
from slimfleet.agent.errors import SlimfleetError, VerifyError
from slimfleet.agent.link import Backoff, Link, Message, Subscription
from slimfleet.agent.serve import HttpApi
from slimfleet.agent.sessions import Serving, SwapError
from slimfleet.agent.store import AgentState, ModelStore, atomic_write_bytes
from slimfleet.agent.telemetry import Telemetry
from slimfleet.agent.wire import (
    EVENT_DOWNLOAD_PROGRESS,
    EVENT_FALLBACK,
    EVENT_VERIFY_FAILED,
    Desired,
    Manifest,
    ModelRef,
)

log = logging.getLogger(__name__)

STATUS_NO_MODEL = "no_model"
STATUS_SERVING = "serving"
STATUS_DOWNLOADING = "downloading"
STATUS_ACTIVATING = "activating"
DESIRED_FILE = "desired.json"  # the last accepted desired state, in the store root


@dataclass(frozen=True)
class Timing:
    """How patient the agent is; the defaults suit a real fleet, tests shorten them."""

    manifest_timeout_s: float = 60.0  # wait for a retained manifest (while connected)
    # retry: after a transient failure (download, manifest); link: between reconnects
    chunk_timeout_s: float = 60.0  # wait for the next chunk (while connected)
    retry: Backoff = field(default_factory=lambda: Backoff(initial_s=5.0, max_s=300.0))
    link: Backoff = field(default_factory=Backoff)  # between reconnect attempts


class _Failed(Exception):
    """Internal: reaching a desired state failed at ``stage``.

    ``permanent`` failures are not retried until a new desired state arrives;
    ``verify`` ones are refusals (reported as verify_failed too); ``reported`` means
    the events were already emitted (by Serving).
    """

    def __init__(
        self,
        stage: str,
        reason: str,
        *,
        permanent: bool = False,
        verify: bool = False,
        reported: bool = False,
    ) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.permanent = permanent
        self.verify = verify
        self.reported = reported


class _Superseded(Exception):
    """Internal: a newer desired state arrived while this one was being applied."""


def _ref(ref: ModelRef | None) -> dict[str, Any] | None:
    return ref.to_dict() if ref else None


class Agent:
    """One device agent. ``start()`` returns at once; ``stop()`` shuts it down cleanly."""

    def __init__(self, config: AgentConfig, *, timing: Timing | None = None) -> None:
        self.config = config
        self.timing = timing or Timing()
        self.topics = config.topics
        self.verifier = config.verifier()
        self.store = ModelStore(config.store_dir, keep=config.keep_versions)
        self.telemetry = Telemetry(config.device_id)
        self.serving = Serving(
            threads=config.threads,
            watch=config.watch,
            on_event=self._publish_event,
            on_fallback=self._on_watch_fallback,
            on_settled=self._on_settled,
            telemetry=self.telemetry,
        )
        self.http = (
            HttpApi(self.serving, config.http.host, config.http.port) if config.http else None
        )
        self.link = Link(
            config.broker,
            config.device_id,
            status_topic=self._topic("status"),
            backoff=self.timing.link,
        )
        self._lock = threading.RLock()
        self._state = self.store.load_state()
        self._status = STATUS_NO_MODEL
        self._error: dict[str, Any] | None = None
        self._desired: Desired | None = None
        self._desired_envelope: bytes | None = None  # its signed bytes, as persisted
        self._done: Desired | None = None  # applied, or failed for good
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._subscription: Subscription | None = None
        # Timings of the last model update (seconds), also in the state document.
        self.last_update: dict[str, Any] | None = None
        self._load_desired()

    # -- in-process API -----------------------------------------------------------

    def infer(self, feeds: Mapping[str, Any], *, cast: bool = False) -> dict[str, np.ndarray]:
        """Run the serving model (see :meth:`Serving.infer`)."""
        return self.serving.infer(feeds, cast=cast)

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http else None

    def start(self) -> None:
        """Serve the last good model, start HTTP, then connect and follow the desired state."""
        self._serve_last_good()
        if self.http is not None:
            self.http.start()
        self._subscription = self.link.subscribe([self._topic("desired")])
        self._publish_state()
        self.link.start()
        self._wake.set()  # a desired state accepted before a restart is resumed at once
        for target, name in (
            (self._listen, "desired"),
            (self._control, "control"),
            (self._report, "telemetry"),
        ):
            thread = threading.Thread(target=target, name=f"agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("agent %s started", self.config.device_id)

    def stop(self) -> None:
        """Cancel work in progress, publish ``offline``, close sessions and the HTTP API."""
        self._stop.set()
        self._cancel.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.link.stop()
        if self.http is not None:
            self.http.stop()
        self.serving.close()
        log.info("agent %s stopped", self.config.device_id)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- startup --------------------------------------------------------------------

    def _serve_last_good(self) -> None:
        """Serve the last good model (or, failing that, the previous one) at once."""
        state = self._state
        candidates = [r for r in dict.fromkeys((state.last_good, state.previous)) if r]
        for i, ref in enumerate(candidates):
            if not self.store.has(ref):
                log.warning("%s is not in the store", ref)
                continue
            try:
                self.serving.start(ref, self.store.model_path(ref), self._smoke_inputs(ref))
            except SwapError as exc:
                following = candidates[i + 1] if i + 1 < len(candidates) else None
                self._emit(EVENT_FALLBACK, ref, to=_ref(following), stage="start", reason=str(exc))
                continue
            self._status = STATUS_SERVING
            if state.current != ref or state.last_good != ref:
                previous = state.previous if state.previous != ref else None
                self._save_state(AgentState(current=ref, last_good=ref, previous=previous))
            return
        if state.current is not None:
            self._save_state(AgentState())

    def _smoke_inputs(self, ref: ModelRef) -> dict[str, np.ndarray] | None:
        """The smoke-test inputs of an installed model, to warm it up on real shapes."""
        try:
            where = str(self.store.manifest_path(ref))
            manifest = Manifest.from_dict(
                self.verifier.verify(self.store.read_manifest(ref), where)
            )
        except SlimfleetError as exc:
            log.warning("%s: no warm-up inputs: %s", ref, exc)
            return None
        return manifest.smoke.inputs if manifest.smoke else None

    def _load_desired(self) -> None:
        """The last accepted desired state (replay protection; failed ones stay failed)."""
        path = self.store.root / DESIRED_FILE
        try:
            doc = json.loads(path.read_bytes())
            desired = self._verify_desired(doc["envelope"].encode(), str(path))
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError, VerifyError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return
        self._desired, self._desired_envelope = desired, doc["envelope"].encode()
        if doc.get("failed"):
            self._done = desired

    def _save_desired(self, envelope: bytes, failed: bool) -> None:
        """Persist the accepted desired state; a disk error is logged, not raised, so the
        agent keeps following it in memory (a restart then resumes the previous one)."""
        doc = {"envelope": envelope.decode(), "failed": failed}
        try:
            atomic_write_bytes(self.store.root / DESIRED_FILE, json.dumps(doc).encode())
        except OSError as exc:
            log.error("cannot persist the desired state: %s", exc)

    # -- threads --------------------------------------------------------------------

    def _listen(self) -> None:
        """Take signed desired states off the link; wake the control loop on a change."""
        while not self._stop.is_set():
            assert self._subscription is not None
            message = self._subscription.get(timeout=0.5)
            if message is None:
                continue
            try:
                self._on_desired(message)
            except Exception:  # a bug must not stop the agent following its desired state
                log.exception("handling %s failed", message.topic)

    def _on_desired(self, message: Message) -> None:
        if not message.payload:
            log.info("desired state cleared: keeping the current model")
            return
        try:
            desired = self._verify_desired(message.payload, message.topic)
            accepted = self._desired
            if accepted is not None and desired.issued < accepted.issued:
                raise VerifyError(
                    f"{message.topic}: issued before the desired state already accepted (a replay?)"
                )
        except VerifyError as exc:
            self._emit(EVENT_VERIFY_FAILED, None, stage="desired", reason=str(exc))
            return
        with self._lock:
            if desired == self._desired:
                return
            self._desired, self._desired_envelope = desired, message.payload
            self._save_desired(message.payload, failed=False)
        log.info(
            "desired: %s@%s%s", desired.name, desired.version, " (rollback)" * desired.rollback
        )
        self._cancel.set()  # whatever is being applied is superseded
        self._wake.set()
        self._publish_state()

    def _verify_desired(self, payload: bytes, what: str) -> Desired:
        desired = Desired.from_dict(self.verifier.verify(payload, what))
        if desired.device != self.config.device_id:
            raise VerifyError(f"{what}: desired state is for device {desired.device!r}")
        return desired

    def _control(self) -> None:
        """Bring the serving model to the desired one; retry transient failures."""
        attempt, retry_at = 0, None
        while not self._stop.is_set():
            timeout = None if retry_at is None else max(0.0, retry_at - time.monotonic())
            woken = self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                desired = self._desired
                self._cancel.clear()
            if self._stop.is_set():  # stop() may have set cancel just before the clear
                return
            if desired is None or desired == self._done:
                retry_at = None
                continue
            if woken:
                attempt = 0
            try:
                self._apply(desired)
            except _Superseded:
                continue
            except _Failed as failure:
                self._failed(desired, failure)
                if not failure.permanent:
                    retry_at = time.monotonic() + self.timing.retry.delay(attempt)
                    attempt += 1
                    continue
            except Exception as exc:  # a bug must not kill the agent: report, retry later
                log.exception("applying %s@%s failed", desired.name, desired.version)
                self._failed(desired, _Failed("internal", repr(exc)))
                retry_at = time.monotonic() + self.timing.retry.delay(attempt)
                attempt += 1
                continue
            retry_at = None
            with self._lock:
                self._done = desired

    def _report(self) -> None:
        """Publish telemetry every interval (QoS 0: dropped while offline)."""
        topic = self._topic("telemetry")
        while not self._stop.wait(self.config.telemetry_interval_s):
            try:
                snapshot = self.telemetry.snapshot()
                self.link.publish(topic, json.dumps(snapshot).encode(), qos=0)
            except Exception:  # a bug costs one report, not all the following ones
                log.exception("publishing telemetry failed")

    # -- applying a desired state ---------------------------------------------------------

    def _apply(self, desired: Desired) -> None:
        target = ModelRef(desired.name, desired.version)
        if self.serving.current == target:
            self._set_status(STATUS_SERVING, clear_error=True)
            return
        self._check_order(desired, target)
        update: dict[str, Any] = {"model": target.to_dict(), "download_s": 0.0, "bytes": 0}
        if self.store.has(target):
            seen = time.monotonic()
            manifest = self._stored_manifest(target)
        else:
            envelope = self._fetch_manifest(target)
            seen = time.monotonic()
            where = self.topics.manifest(target.name, target.version)
            manifest = self._check_manifest(envelope, target, where)
            self._set_status(STATUS_DOWNLOADING)
            download = self._download(manifest)
            installing = time.monotonic()
            try:
                self.store.install(target, download.partial.data_path, envelope)
            except SlimfleetError as exc:
                raise _Failed("install", str(exc)) from None
            clear_partials(self.store.partial_dir())
            update.update(
                download_s=round(download.seconds, 4),
                install_s=round(time.monotonic() - installing, 4),
                bytes=manifest.size,
                resumed_chunks=download.resumed,
            )
        swap_ok, serving = self._activate(target, manifest)
        update["load_s"] = round(swap_ok["load_ms"] / 1000, 4)
        update["activate_s"] = round(swap_ok["total_ms"] / 1000, 4)
        update["total_s"] = round(serving - seen, 4)
        with self._lock:
            self.last_update = update
        self._publish_state()

    def _stored_manifest(self, target: ModelRef) -> Manifest:
        """The manifest ``target`` was installed with, checked again (keys may have changed).

        Its expiry is not checked: it was valid when installed, and a signed rollback to
        it must work after its TTL. A stored version that no longer verifies is removed,
        so the retry downloads it.
        """
        try:
            envelope = self.store.read_manifest(target)
            where = str(self.store.manifest_path(target))
            return self._check_manifest(envelope, target, where, installed=True)
        except (SlimfleetError, _Failed):
            self.store.remove(target)
            raise

    def _check_order(self, desired: Desired, target: ModelRef) -> None:
        state = self._state
        floor = state.last_good or state.current
        if floor and floor.name == target.name and target.version < floor.version:
            if not desired.rollback:
                raise _Failed(
                    "version",
                    f"{target} is older than the last good {floor} and the desired state "
                    "is not a signed rollback",
                    permanent=True,
                    verify=True,
                )
            log.info("rolling back from %s to %s", floor, target)

    def _fetch_manifest(self, target: ModelRef) -> bytes:
        """The retained manifest envelope of ``target``."""
        topic = self.topics.manifest(target.name, target.version)
        waited, last = 0.0, time.monotonic()
        with self.link.subscribe([topic]) as sub:
            while True:
                message = sub.get(timeout=0.25)
                if message is not None and message.topic == topic and message.payload:
                    return message.payload
                if self._cancel.is_set():
                    raise _Superseded()
                now = time.monotonic()
                if self.link.connected:  # a broker outage does not count
                    waited += now - last
                last = now
                if waited > self.timing.manifest_timeout_s:
                    raise _Failed(
                        "manifest",
                        f"no manifest on {topic} after {self.timing.manifest_timeout_s:g}s",
                    )

    def _check_manifest(
        self, envelope: bytes, target: ModelRef, where: str, *, installed: bool = False
    ) -> Manifest:
        """Verify ``envelope`` describes ``target``; a fetched one must not have expired."""
        try:
            manifest = Manifest.from_dict(self.verifier.verify(envelope, where))
        except VerifyError as exc:
            raise _Failed("manifest", str(exc), verify=True) from None
        if (manifest.name, manifest.version) != (target.name, target.version):
            raise _Failed(
                "manifest",
                f"{where}: describes {manifest.name}@{manifest.version}, not {target}",
                verify=True,
            )
        if not installed and manifest.expired():  # published versions never change: final
            raise _Failed(
                "expired",
                f"{target}: the manifest expired at {time.ctime(manifest.expires)}",
                permanent=True,
                verify=True,
            )
        if manifest.size > self.config.max_model_bytes:
            raise _Failed(
                "size",
                f"{target} is {manifest.size} bytes, over this device's limit of "
                f"{self.config.max_model_bytes}",
                permanent=True,
                verify=True,
            )
        return manifest

    def _download(self, manifest: Manifest) -> ChunkDownload:
        """Fetch and verify the model file (``download.partial.data_path``)."""
        download = ChunkDownload(
            self.link,
            self.topics,
            manifest,
            self.store.partial_dir(),
            max_bytes=self.config.max_model_bytes,
            chunk_timeout_s=self.timing.chunk_timeout_s,
            on_progress=self._on_progress,
            cancel=self._cancel,
        )
        try:
            download.run()
        except DownloadCancelled:
            raise _Superseded() from None
        except VerifyError as exc:
            raise _Failed("download", str(exc), verify=True) from None
        except (DownloadError, OSError) as exc:
            raise _Failed("download", str(exc)) from None
        log.info(
            "downloaded %s@%s: %d bytes in %.2fs (%d chunks resumed)",
            manifest.name,
            manifest.version,
            manifest.size,
            download.seconds,
            download.resumed,
        )
        return download

    def _on_progress(self, download: ChunkDownload) -> None:
        m = download.manifest
        self._emit(
            EVENT_DOWNLOAD_PROGRESS,
            ModelRef(m.name, m.version),
            done_chunks=download.done_count,
            resumed_chunks=download.resumed,
            total_chunks=download.total,
            bytes=download.bytes_done,
            total_bytes=m.size,
            percent=round(100 * download.done_count / download.total, 1),
        )

    def _activate(self, target: ModelRef, manifest: Manifest) -> tuple[dict[str, Any], float]:
        """Load, smoke-test and swap in ``target``; persist the state.

        Returns the ``swap_ok`` event and the monotonic time the new model began serving.
        """
        self._set_status(STATUS_ACTIVATING)
        before = self.serving.current
        try:
            swap_ok = self.serving.activate(
                target,
                self.store.model_path(target),
                smoke=manifest.smoke,
                max_latency_ms=self.config.smoke_max_latency_ms,
            )
        except SwapError as exc:
            raise _Failed(exc.stage, exc.reason, permanent=True, reported=True) from None
        serving = time.monotonic()
        # Watched, it becomes the last good one when it survives the window (_on_settled).
        watched = before is not None and self.config.watch.window_s > 0
        with self._lock:
            last_good = self._state.last_good if watched else target
            self._save_state(AgentState(current=target, last_good=last_good, previous=before))
            self._status = STATUS_SERVING
            self._error = None
        return swap_ok, serving

    def _failed(self, desired: Desired, failure: _Failed) -> None:
        """Report a failure to reach ``desired``; the serving model is unchanged."""
        target = ModelRef(desired.name, desired.version)
        log.warning("%s: %s failed: %s", target, failure.stage, failure.reason)
        if not failure.reported:
            if failure.verify:
                self._emit(EVENT_VERIFY_FAILED, target, stage=failure.stage, reason=failure.reason)
            self._emit(
                EVENT_FALLBACK,
                target,
                to=_ref(self.serving.current),
                stage=failure.stage,
                reason=failure.reason,
            )
        with self._lock:
            self._record_error(target, failure.stage, failure.reason)
            if failure.permanent:
                self._give_up(desired)
        self._set_status(STATUS_SERVING if self.serving.current else STATUS_NO_MODEL)

    def _record_error(self, model: ModelRef, stage: str, reason: str) -> None:
        self._error = {
            "model": model.to_dict(),
            "stage": stage,
            "reason": reason,
            "ts": time.time(),
        }

    def _give_up(self, desired: Desired) -> None:
        """No more attempts at ``desired``, even after a restart, until a new one arrives."""
        self._done = desired
        if desired == self._desired and self._desired_envelope is not None:
            self._save_desired(self._desired_envelope, failed=True)

    # -- Serving callbacks (watch thread) ---------------------------------------------

    def _on_watch_fallback(self, bad: ModelRef, to: ModelRef | None, reason: str) -> None:
        with self._lock:
            state = self._state
            last_good = to if state.last_good in (None, bad) else state.last_good
            self._save_state(AgentState(current=to, last_good=last_good, previous=None))
            self._record_error(bad, "watch", reason)
            desired = self._desired
            if desired is not None and (desired.name, desired.version) == (bad.name, bad.version):
                self._give_up(desired)
        self._publish_state()

    def _on_settled(self, ref: ModelRef) -> None:
        with self._lock:
            state = self._state
            if state.current == ref:
                self._save_state(AgentState(current=ref, last_good=ref, previous=state.previous))
        self._publish_state()

    # -- state and events ---------------------------------------------------------------

    def _save_state(self, state: AgentState) -> None:
        """Persist ``state`` atomically and drop versions nothing points at any more."""
        with self._lock:
            self.store.save_state(state)
            self._state = state
            try:
                self.store.prune(protect=state.refs())
            except (OSError, SlimfleetError) as exc:
                log.warning("pruning the store failed: %s", exc)

    def _set_status(self, status: str, *, clear_error: bool = False) -> None:
        with self._lock:
            self._status = status
            if clear_error:
                self._error = None
        self._publish_state()

    def state_document(self) -> dict[str, Any]:
        """What the agent publishes, retained, on ``devices/<id>/state``."""
        with self._lock:
            state, desired = self._state, self._desired
            return {
                "device": self.config.device_id,
                "ts": time.time(),
                "status": self._status,
                "current": _ref(self.serving.current),
                "last_good": _ref(state.last_good),
                "previous": _ref(state.previous),
                "desired": {
                    "name": desired.name,
                    "version": desired.version,
                    "rollback": desired.rollback,
                    "issued": desired.issued,
                }
                if desired
                else None,
                "error": self._error,
                "last_update": self.last_update,
            }

    def _publish_state(self) -> None:
        self.link.set_retained(self._topic("state"), json.dumps(self.state_document()).encode())

    def _emit(self, kind: str, model: ModelRef | None, **fields: Any) -> None:
        event = {"type": kind, "ts": time.time(), "model": _ref(model), **fields}
        self.telemetry.count_event(event)
        self._publish_event(event)

    def _publish_event(self, event: dict[str, Any]) -> None:
        event = {**event, "device": self.config.device_id}
        if event["type"] != EVENT_DOWNLOAD_PROGRESS:
            log.info("event %s", json.dumps(event))
        self.link.publish(self._topic("events"), json.dumps(event).encode(), qos=1)

    def _topic(self, leaf: str) -> str:
        return self.topics.device(self.config.device_id, leaf)


# -- the command ----------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The agent's agent.yaml (see examples/agent.yaml).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only log errors.")
def cli(config_path: Path, verbose: int, quiet: bool) -> None:
    """Run the slimfleet edge agent until SIGTERM or SIGINT.

    Serves the last good model at once, follows the device's desired state from the
    fleet's MQTT broker, and reports state, events and telemetry.
    """
    setup_logging(verbose, quiet)
    config = load_agent_config(config_path)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(config)
    agent.start()
    current = agent.serving.current
    click.echo(
        f"slimfleet-agent {config.device_id}: serving {current or 'no model yet'}"
        + (f", HTTP on {agent.http_url}" if agent.http_url else "")
        + f", broker {config.broker.url}",
        err=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        agent.stop()


def main() -> None:
    """Console-script entry point."""
    run_cli(cli, "slimfleet-agent")
