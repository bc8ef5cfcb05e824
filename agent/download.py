"""Fetching a model's chunks over MQTT, resumable across disconnects and restarts.

Like AWS IoT's MQTT file delivery, the device keeps a bitmap of the blocks it has and
asks only for the missing ones: it subscribes to a small window of the chunk topics
it still needs (``models/<name>/<version>/chunk/<i>``, retained by the host), checks
each chunk's sha256 against the manifest, writes it at its offset in a preallocated
partial file and, every so often, replaces the persisted bitmap atomically. The
bitmap is only a claim: a restart re-checks the hash of every chunk it claims (data
that never reached the disk fails and is fetched again), so the data needs no fsync
until the finished file is installed. The whole-file sha256 is computed as the
chunks arrive in order and checked, with the size, before the caller installs it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from slimfleet.agent.errors import SlimfleetError, VerifyError
from slimfleet.agent.inbox import MAX_PACKET_BYTES, chunk_limit
from slimfleet.agent.link import Link
from slimfleet.agent.store import atomic_write_bytes
from slimfleet.agent.wire import Manifest, Topics, loads_json, sha256_hex

log = logging.getLogger(__name__)


class DownloadError(SlimfleetError):
    """Chunks stopped arriving (the download can be resumed later)."""


class DownloadCancelled(DownloadError):
    """The download was cancelled; what it fetched is kept for a resume."""


class PartialFile:
    """A preallocated file filled chunk by chunk, and the persisted bitmap of done chunks.

    Files are named after the model's sha256, so a different model published under
    the same name and version never reuses stale blocks.
    """

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.manifest = manifest
        stem = f"{manifest.name}-{manifest.version}-{manifest.sha256[:16]}"
        self.data_path = Path(directory) / f"{stem}.part"
        self.bitmap_path = Path(directory) / f"{stem}.bitmap"
        self.done: set[int] = set()
        self.dirty = False  # chunks written since the bitmap was last persisted
        self._fd = -1
        self._digest = hashlib.sha256()  # of chunks 0 .. _hashed-1
        self._hashed = 0

    def open(self) -> None:
        """Open (creating and preallocating if needed) and load the verified done set."""
        m = self.manifest
        fresh = not self.data_path.exists() or self.data_path.stat().st_size != m.size
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        if fresh:
            os.ftruncate(self._fd, 0)
            if m.size and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._fd, 0, m.size)
            os.ftruncate(self._fd, m.size)
            self.done = set()
            self.bitmap_path.unlink(missing_ok=True)
            return
        claimed = self._load_bitmap()
        self.done = {i for i in claimed if self._chunk_ok(i)}
        if len(self.done) != len(claimed):
            log.warning(
                "%s: %d chunk(s) claimed by the bitmap failed their hash and will be fetched again",
                self.data_path.name,
                len(claimed) - len(self.done),
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.chunk_count) if i not in self.done]

    def write(self, index: int, payload: bytes) -> None:
        os.pwrite(self._fd, payload, index * self.manifest.chunk_size)
        self.done.add(index)
        self.dirty = True
        self._hash_prefix(index, payload)

    def _hash_prefix(self, index: int = -1, payload: bytes = b"") -> None:
        """Feed the whole-file hash every chunk of the done prefix not fed yet."""
        while self._hashed in self.done:
            i = self._hashed
            self._digest.update(payload if i == index else self._read_chunk(i))
            self._hashed += 1

    def _read_chunk(self, index: int) -> bytes:
        m = self.manifest
        start = index * m.chunk_size
        return os.pread(self._fd, min(m.chunk_size, m.size - start), start)

    def persist(self) -> None:
        """Record which chunks the file holds (atomically; see the module docstring)."""
        bits = bytearray((self.manifest.chunk_count + 7) // 8)
        for i in self.done:
            bits[i // 8] |= 1 << (i % 8)
        doc = {
            "sha256": self.manifest.sha256,
            "size": self.manifest.size,
            "chunk_size": self.manifest.chunk_size,
            "done": base64.b64encode(bytes(bits)).decode(),
        }
        atomic_write_bytes(self.bitmap_path, json.dumps(doc).encode())
        self.dirty = False

    def verify(self) -> Path:
        """Check the whole file's size and sha256 (every chunk done); a mismatch discards it."""
        m = self.manifest
        size = os.fstat(self._fd).st_size
        self._hash_prefix()
        digest = self._digest.hexdigest() if self._hashed == m.chunk_count else "incomplete"
        if size != m.size or digest != m.sha256:
            self.close()
            self.discard()
            raise VerifyError(
                f"{m.name}@{m.version}: the assembled file does not match the manifest "
                f"(size {size}/{m.size}, sha256 {digest[:16]}…/{m.sha256[:16]}…)"
            )
        return self.data_path

    def discard(self) -> None:
        self.data_path.unlink(missing_ok=True)
        self.bitmap_path.unlink(missing_ok=True)

    def _load_bitmap(self) -> set[int]:
        m = self.manifest
        try:
            doc = loads_json(self.bitmap_path.read_bytes())
            if (doc["sha256"], doc["size"], doc["chunk_size"]) != (m.sha256, m.size, m.chunk_size):
                return set()
            bits = base64.b64decode(doc["done"], validate=True)
        except (OSError, ValueError, KeyError, TypeError):
            return set()
        return {i for i in range(min(m.chunk_count, len(bits) * 8)) if bits[i // 8] >> (i % 8) & 1}

    def _chunk_ok(self, index: int) -> bool:
        return sha256_hex(self._read_chunk(index)) == self.manifest.chunks[index]


def clear_partials(directory: Path) -> None:
    """Remove every partial download (after an install, nothing there is needed)."""
    for path in Path(directory).iterdir():
        if path.suffix in (".part", ".bitmap"):
            path.unlink(missing_ok=True)


ASK_AGAIN_S = 3.0
"""With chunks pending and none arriving for this long, the download subscribes to them
again (the broker re-sends retained messages on a new subscription)."""


class ChunkDownload:
    """Fetch the chunks of one manifest through ``link`` into ``partial_dir``.

    ``window`` chunk topics are subscribed at a time (bounding memory and letting the
    broker pace us); the subscription drops a message over ``chunk_limit(chunk_size)``
    bytes unread and queues at most ``window`` such chunks' bytes. ``chunk_timeout_s`` is how long the download waits for the next
    chunk while the link is up before it gives up with :class:`DownloadError`.
    ``on_progress(download)`` is called each time another ``progress_step`` of the
    chunks is done. ``received`` lists the index of every chunk message that arrived,
    duplicates included, in order.
    """

    def __init__(
        self,
        link: Link,
        topics: Topics,
        manifest: Manifest,
        partial_dir: Path,
        *,
        max_bytes: int,
        window: int = 16,
        chunk_timeout_s: float = 30.0,
        persist_every_s: float = 0.5,
        progress_step: float = 0.1,
        on_progress: Callable[[ChunkDownload], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if manifest.size > max_bytes:
            raise VerifyError(
                f"{manifest.name}@{manifest.version} is {manifest.size} bytes, "
                f"over this device's limit of {max_bytes}"
            )
        self.link = link
        self.topics = topics
        self.manifest = manifest
        self.partial = PartialFile(partial_dir, manifest)
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.persist_every_s = persist_every_s
        self.progress_step = progress_step
        self.on_progress = on_progress
        self.cancel = cancel or threading.Event()
        self.received: list[int] = []
        self.resumed = 0  # chunks already on disk when the download started
        self.seconds = 0.0

    @property
    def total(self) -> int:
        return self.manifest.chunk_count

    @property
    def done_count(self) -> int:
        return len(self.partial.done)

    @property
    def bytes_done(self) -> int:
        m = self.manifest
        last = m.chunk_count - 1
        return sum(
            m.size - last * m.chunk_size if i == last else m.chunk_size for i in self.partial.done
        )

    def run(self) -> Path:
        """Download what is missing and return the verified file's path."""
        started = time.monotonic()
        try:
            self.partial.open()  # in the try: a failed preallocation must close the file
            self.resumed = self.done_count
            if self.resumed:
                log.info("%s: resuming with %d/%d chunks", self._label, self.resumed, self.total)
            self._fetch_missing()
            if self.partial.dirty:  # a resumed file already whole needs no write (full disk)
                self.partial.persist()
            return self.partial.verify()
        finally:
            self.partial.close()
            self.seconds = time.monotonic() - started

    @property
    def _label(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def _fetch_missing(self) -> None:
        queue = self.partial.missing()
        by_topic = {
            self.topics.chunk(self.manifest.name, self.manifest.version, i): i for i in queue
        }
        topic_of = {i: t for t, i in by_topic.items()}
        pending: set[int] = set()
        next_step = self._next_step()
        last_chunk = last_persist = time.monotonic()
        limit = min(chunk_limit(self.manifest.chunk_size), MAX_PACKET_BYTES)
        asked = time.monotonic()  # when the pending chunks were last (re)subscribed
        # twice the window: after a reconnect a chunk may come both as the session's
        # redelivery and as the retained copy the new subscription sends
        with self.link.subscribe(max_bytes=limit, max_queued_bytes=2 * self.window * limit) as sub:
            while queue or pending:
                refill = queue[: self.window - len(pending)]
                if refill:
                    del queue[: len(refill)]
                    pending.update(refill)
                    sub.add(topic_of[i] for i in refill)
                if self.cancel.is_set():
                    self.partial.persist()
                    raise DownloadCancelled(f"{self._label}: download cancelled")
                msg = sub.get(timeout=0.25)
                now = time.monotonic()
                if not self.link.connected:
                    last_chunk = now  # a broker outage is not the chunks' fault
                if msg is None:
                    if self.partial.dirty:  # idle: a good moment to record progress
                        self.partial.persist()
                        last_persist = now
                    if (
                        self.link.connected
                        and now - max(last_chunk, asked) > ASK_AGAIN_S
                        and pending
                    ):
                        # a copy dropped on a full queue or lost in a broker restart is
                        # never sent again unprompted: subscribing anew re-sends retained ones
                        again = [topic_of[i] for i in pending]
                        sub.remove(again)
                        sub.add(again)
                        asked = now
                    if now - last_chunk > self.chunk_timeout_s:
                        self.partial.persist()
                        raise DownloadError(
                            f"{self._label}: no chunk arrived for {self.chunk_timeout_s:.0f}s "
                            f"({self.done_count}/{self.total} done, will resume)"
                        )
                    continue
                index = by_topic.get(msg.topic)
                if index is None:
                    continue
                self.received.append(index)
                if index not in pending:
                    continue  # a duplicate (redelivery or retained copy)
                self._check_chunk(index, msg.payload)
                self.partial.write(index, msg.payload)
                pending.discard(index)
                sub.remove([msg.topic])
                last_chunk = now
                if now - last_persist >= self.persist_every_s:
                    self.partial.persist()
                    last_persist = now
                if self.done_count >= next_step:
                    next_step = self._next_step()
                    if self.on_progress is not None:
                        self.on_progress(self)

    def _next_step(self) -> float:
        """The done count at which on_progress fires next."""
        step = max(1.0, self.total * self.progress_step)
        return (
            (int(self.done_count / step) + 1) * step
            if self.done_count < self.total
            else self.total + 1
        )

    def _check_chunk(self, index: int, payload: bytes) -> None:
        m = self.manifest
        expected = min(m.chunk_size, m.size - index * m.chunk_size) if m.size else 0
        if len(payload) != expected or sha256_hex(payload) != m.chunks[index]:
            self.partial.persist()
            raise VerifyError(
                f"{self._label}: chunk {index} does not match the manifest "
                f"({len(payload)} bytes, sha256 {sha256_hex(payload)[:16]}…) and was refused"
            )
