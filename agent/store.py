"""The agent's files: versioned models, the signed manifests they came with, and its state.

Layout under the store root::

    models/<name>/<version>/model.onnx      the verified model
    models/<name>/<version>/manifest.json   the raw signed envelope it was delivered with
    partial/                                downloads in progress (filled by the downloader)
    quarantine/<name>@<version>.<unix s>/   versions whose file no longer matched (newest 4)
    state.json                              deployments, replay floor, enrolment time
    desired.json                            the last desired state (see agent/desired.py)

Every write goes to a temporary name in the same directory, is fsynced, renamed into
place and the directory fsynced, so a crash at any moment leaves either the old or
the new file, never half of one. Temporaries left by a crash are removed at open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimfleet.agent.deployment import (
    SCHEMA_VERSION_DESIRED,
    Deployment,
    deployment_from_dict,
    deployment_to_dict,
)
from slimfleet.agent.errors import SlimfleetError, VerifyError
from slimfleet.agent.wire import ModelRef, loads_json

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-"
KEEP_QUARANTINED = 4
HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class AgentState:
    """What the agent serves, what last proved good, the one before, and its freshness.

    Deployments are slot -> SlotSpec (``None``: nothing yet). ``floor`` is the highest
    desired-state seq the device accepted (the replay floor, also in desired.json);
    ``enrolled`` the Unix time this store was created (desired states issued before it
    are refused, so a wiped device cannot be fed an old captured one).
    """

    current: Deployment | None = None
    last_good: Deployment | None = None
    previous: Deployment | None = None
    floor: int = 0
    enrolled: float = 0.0

    def refs(self) -> list[ModelRef]:
        """The models this state points at (the ones pruning must keep)."""
        refs: dict[ModelRef, None] = {}
        for deployment in (self.current, self.last_good, self.previous):
            for spec in (deployment or {}).values():
                refs.update(dict.fromkeys(spec.models))
        return list(refs)

    def to_dict(self) -> dict[str, Any]:
        def doc(d: Deployment | None) -> dict[str, Any] | None:
            return None if d is None else deployment_to_dict(d)

        return {
            "schema": SCHEMA_VERSION_DESIRED,
            "current": doc(self.current),
            "last_good": doc(self.last_good),
            "previous": doc(self.previous),
            "floor": self.floor,
            "enrolled": self.enrolled,
        }

    @classmethod
    def from_dict(cls, doc: Any) -> AgentState:
        """Inverse of :meth:`to_dict`; raises ValueError on anything else."""
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION_DESIRED:
            raise ValueError(f"state is not a schema-{SCHEMA_VERSION_DESIRED} JSON object")
        floor, enrolled = doc.get("floor"), doc.get("enrolled")
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError("state: floor must be an integer >= 0")
        if not _finite(enrolled):
            raise ValueError("state: enrolled must be a number")
        try:
            deployments = {
                key: None if doc.get(key) is None else deployment_from_dict(doc[key], key)
                for key in ("current", "last_good", "previous")
            }
        except VerifyError as exc:
            raise ValueError(str(exc)) from None
        return cls(**deployments, floor=floor, enrolled=float(enrolled))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileTooLarge(ValueError):
    """A file holds more than its reader's limit."""


def read_bounded(path: Path | str, limit: int) -> bytes:
    """The bytes of the regular file at ``path`` if it holds at most ``limit``: OSError
    when it cannot be opened, ValueError when it is not a regular file (a FIFO, a device
    such as ``/dev/zero``, a directory) or :class:`FileTooLarge` when it holds more (it is
    not read further)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"over {limit} bytes")
    return data


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync dir.

    ``mode`` is the new file's permissions before the umask (by default private).
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class ModelStore:
    """Versioned model files and the agent state under one root directory.

    ``keep`` is how many versions of each model :meth:`prune` leaves on disk (the
    ones the state points at are kept in addition).
    """

    def __init__(self, root: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self._models = self.root / "models"
        self._partial = self.root / "partial"
        try:
            self._models.mkdir(parents=True, exist_ok=True)
            self._partial.mkdir(exist_ok=True)
        except OSError as exc:
            raise SlimfleetError(f"{self.root}: cannot create the model store: {exc}") from None
        self._clean_temporaries()

    # -- models ---------------------------------------------------------------------

    def version_dir(self, ref: ModelRef) -> Path:
        return self._models / ref.name / str(ref.version)

    def model_path(self, ref: ModelRef) -> Path:
        """Where the model file of ``ref`` lives (whether or not it is installed)."""
        return self.version_dir(ref) / MODEL_FILE

    def manifest_path(self, ref: ModelRef) -> Path:
        return self.version_dir(ref) / MANIFEST_FILE

    def has(self, ref: ModelRef) -> bool:
        """True when ``ref`` is fully installed (both files are there)."""
        return self.model_path(ref).is_file() and self.manifest_path(ref).is_file()

    def read_manifest(self, ref: ModelRef) -> bytes:
        """The signed envelope ``ref`` was installed with."""
        try:
            return self.manifest_path(ref).read_bytes()
        except OSError as exc:
            raise SlimfleetError(f"{ref}: cannot read its manifest: {exc}") from None

    def installed(self, name: str | None = None) -> list[ModelRef]:
        """Installed refs, sorted; only those of ``name`` when given."""
        names = [name] if name is not None else [p.name for p in self._models.iterdir()]
        refs = []
        for model_name in names:
            folder = self._models / model_name
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if not entry.name.isdigit() or int(entry.name) < 1:
                    continue  # temporaries of an install in progress, stray files
                try:
                    ref = ModelRef(model_name, int(entry.name))
                except ValueError:
                    log.warning("ignoring %s: not a valid model name", folder)
                    break
                if self.has(ref):
                    refs.append(ref)
        return sorted(refs)

    def install(
        self, ref: ModelRef, source_file: Path, manifest_bytes: bytes, *, move: bool = True
    ) -> Path:
        """Put a verified model into the store atomically and return its path.

        Both files are written into a temporary folder beside the final one, fsynced,
        and the folder is renamed into place, so ``has(ref)`` never sees half a
        version. ``move`` (default) consumes ``source_file`` when it is on the same
        file system (a finished download); otherwise it is copied. When the install
        fails (a full disk, EFBIG) a moved ``source_file`` is put back, so the retry
        installs the same download instead of fetching it again. Versions are
        immutable: installing one that is already there is an error (``remove`` it
        first to replace it).
        """
        if self.version_dir(ref).exists():
            raise SlimfleetError(f"{ref} is already installed in {self.root}")
        parent = self.version_dir(ref).parent
        tmp = None
        moved = False
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{ref.version}.", dir=parent))
            model = tmp / MODEL_FILE
            if move:
                try:
                    os.replace(source_file, model)
                    moved = True
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
            if not moved:  # a copy, or a move across file systems
                shutil.copyfile(source_file, model)
            _fsync_file(model)
            with open(tmp / MANIFEST_FILE, "wb") as f:
                f.write(manifest_bytes)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            target = self.version_dir(ref)
            os.rename(tmp, target)  # fails rather than merge if a racing install won
            fsync_dir(parent)
        except OSError as exc:
            if moved:  # keep the download for the retry
                try:
                    os.replace(tmp / MODEL_FILE, source_file)
                except OSError as back:
                    log.error("%s: cannot put the download back: %s", ref, back)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise SlimfleetError(f"{ref}: cannot install into {parent}: {exc}") from None
        if move and not moved:
            Path(source_file).unlink()
        log.info("installed %s at %s", ref, target)
        return target / MODEL_FILE

    def check_file(self, ref: ModelRef, sha256: str, size: int) -> str | None:
        """Why the installed model file of ``ref`` no longer matches, or None.

        Re-hashes the whole file (in ``HASH_BLOCK`` reads, constant memory).
        """
        path = self.model_path(ref)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while block := f.read(HASH_BLOCK):
                    digest.update(block)
        except OSError as exc:
            return f"cannot read {path}: {exc}"
        got_size = path.stat().st_size
        if got_size != size or digest.hexdigest() != sha256:
            return (
                f"{path} does not match its signed manifest (size {got_size}/{size}, "
                f"sha256 {digest.hexdigest()[:16]}…/{sha256[:16]}…)"
            )
        return None

    def quarantine(self, ref: ModelRef) -> Path | None:
        """Move ``ref`` out of the models (it is never served again until re-installed).

        Kept under ``quarantine/`` for a post-mortem, the newest ``KEEP_QUARANTINED``
        only. Returns where it went, or None when it was not installed.
        """
        source = self.version_dir(ref)
        if not source.exists():
            return None
        folder = self.root / "quarantine"
        folder.mkdir(exist_ok=True)
        target = folder / f"{ref}.{int(time.time() * 1000)}"
        os.replace(source, target)
        fsync_dir(source.parent)
        for old in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)[:-KEEP_QUARANTINED]:
            shutil.rmtree(old, ignore_errors=True)
        log.warning("quarantined %s at %s", ref, target)
        return target

    def remove(self, ref: ModelRef) -> None:
        """Delete one installed version (no error when it is not there)."""
        target = self.version_dir(ref)
        if not target.exists():
            return
        # Rename first so a crash mid-delete leaves a temporary, not a half version.
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}del.", dir=target.parent))
        os.replace(target, trash / "v")
        fsync_dir(target.parent)
        shutil.rmtree(trash)

    def prune(self, protect: Iterable[ModelRef] = ()) -> list[ModelRef]:
        """Keep the newest ``keep`` versions of every model plus ``protect``; return the removed."""
        protected = set(protect)
        by_name: dict[str, list[ModelRef]] = {}
        for ref in self.installed():
            by_name.setdefault(ref.name, []).append(ref)
        removed = []
        for refs in by_name.values():
            for ref in sorted(refs, reverse=True)[self.keep :]:
                if ref not in protected:
                    self.remove(ref)
                    removed.append(ref)
        if removed:
            log.info("pruned %s", ", ".join(map(str, removed)))
        return removed

    def partial_dir(self) -> Path:
        """A folder for downloads in progress (on the store's file system, so install can move)."""
        self._partial.mkdir(parents=True, exist_ok=True)
        return self._partial

    # -- state ----------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def load_state(self) -> AgentState | None:
        """The saved state, or None when it is missing or corrupt (never an error).

        A corrupt file is kept as ``state.json.corrupt`` for a post-mortem.
        """
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            log.info("no saved state in %s", self.root)
            return None
        except OSError as exc:
            log.warning("cannot read %s (%s): ignoring it", self.state_path, exc)
            return None
        try:
            return AgentState.from_dict(loads_json(raw))
        except (UnicodeDecodeError, ValueError) as exc:
            log.warning(
                "%s is corrupt (%s): ignoring it, kept as %s.corrupt",
                self.state_path,
                exc,
                STATE_FILE,
            )
            os.replace(self.state_path, self.root / f"{STATE_FILE}.corrupt")
            return None

    def save_state(self, state: AgentState) -> None:
        atomic_write_bytes(self.state_path, json.dumps(state.to_dict(), indent=2).encode() + b"\n")

    # -- crash leftovers ------------------------------------------------------------

    def _clean_temporaries(self) -> None:
        leftovers = list(self.root.glob(f"{TMP_PREFIX}*"))
        leftovers += list(self._models.glob(f"*/{TMP_PREFIX}*"))
        leftovers += list(self._partial.glob(f"{TMP_PREFIX}*"))  # bitmaps being replaced
        for path in leftovers:
            log.info("removing %s left by an interrupted write", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


class StateFile:
    """state.json as the agent last adopted it: written only when it differs from what the
    disk holds, and never raising on a disk error (full, read-only, failing). The agent
    then goes on from memory and says so once, and ``on_due`` is called on a timer thread
    every :attr:`RETRY_S` until a write succeeds. Guards nothing itself: the agent calls
    :meth:`save` (also from ``on_due``) under the lock that guards its state."""

    RETRY_S = 10.0

    def __init__(
        self, store: ModelStore, saved: AgentState | None, on_due: Callable[[], None]
    ) -> None:
        self.store = store
        self.saved = saved
        """What state.json holds (None: unknown or absent)."""
        self.error: str | None = None
        """Why the last write failed, while the disk lags behind memory."""
        self.on_due = on_due
        self._timer: threading.Timer | None = None
        self._closed = False

    def save(self, state: AgentState) -> bool:
        """Write ``state`` unless state.json already holds it, then drop versions nothing
        points at any more; False when the disk refused (logged when the reason changes;
        ``on_due`` is called to write again, and nothing is pruned while state.json may
        still point at versions memory has left)."""
        if state != self.saved:
            try:
                self.store.save_state(state)
            except OSError as exc:
                if str(exc) != self.error:
                    log.error(
                        "cannot write %s (%s): going on from memory", self.store.state_path, exc
                    )
                self.error = str(exc)
                self._schedule()
                return False
            if self.error is not None:
                log.info("%s written again", self.store.state_path)
            self.saved, self.error = state, None
        try:
            self.store.prune(protect=state.refs())
        except (OSError, SlimfleetError) as exc:
            log.warning("pruning the store failed: %s", exc)
        return True

    def _schedule(self) -> None:
        timer = self._timer
        if self._closed:
            return  # the agent stopped: the next start writes what differs
        if timer is not None and timer.is_alive() and timer is not threading.current_thread():
            return  # one retry pending is enough
        self._timer = threading.Timer(self.RETRY_S, self.on_due)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        """Cancel a pending retry and schedule no more (the agent is stopping)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
