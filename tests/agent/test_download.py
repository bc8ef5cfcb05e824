"""Chunk download against a real mosquitto: verify, resume, refuse, time out."""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from brokers import Mosquitto

from slimfleet.agent import download
from slimfleet.agent.download import ChunkDownload, DownloadCancelled, DownloadError, PartialFile
from slimfleet.agent.errors import VerifyError
from slimfleet.agent.link import Backoff, Link
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.wire import Manifest, Topics, make_manifest

CHUNK = 4096
CHUNKS = 40


def make_file(
    seed: int = 1, size: int = CHUNK * CHUNKS - 100
) -> tuple[bytes, Manifest, list[bytes]]:
    data = os.urandom(size) if seed < 0 else bytes((i * seed + i // 7) % 251 for i in range(size))
    manifest, chunks = make_manifest(
        "blob", 3, data, io={}, opset=13, key_id="test", chunk_size=CHUNK
    )
    return data, manifest, chunks


def put_chunks(pub, topics: Topics, manifest: Manifest, chunks: list[bytes], only=None):
    for i, chunk in enumerate(chunks):
        if only is None or i in only:
            pub.put(topics.chunk(manifest.name, manifest.version, i), chunk)


def open_link(broker: Mosquitto, client_id: str) -> Link:
    link = Link(
        BrokerSettings("127.0.0.1", broker.port, keepalive=5),
        client_id,
        backoff=Backoff(initial_s=0.1, max_s=0.5),
    )
    link.start()
    assert link.wait_connected(10)
    return link


@pytest.fixture
def link(mosquitto, prefix):
    link = open_link(mosquitto, f"dev-{prefix}")
    yield link
    link.stop()


def test_downloads_verifies_and_reports_progress(link, publisher, prefix, tmp_path):
    topics = Topics(prefix)
    data, manifest, chunks = make_file()
    put_chunks(publisher, topics, manifest, chunks)
    seen = []
    dl = ChunkDownload(
        link,
        topics,
        manifest,
        tmp_path,
        max_bytes=10**6,
        on_progress=lambda d: seen.append(d.done_count),
    )
    path = dl.run()
    assert path.read_bytes() == data
    assert sorted(dl.received) == list(range(CHUNKS))  # each chunk exactly once
    assert seen == [4 * k for k in range(1, 11)]  # every 10%
    assert dl.bytes_done == len(data) and dl.resumed == 0


def test_cancelled_download_resumes_without_fetching_done_chunks_again(
    mosquitto, publisher, prefix, tmp_path
):
    topics = Topics(prefix)
    data, manifest, chunks = make_file()
    put_chunks(publisher, topics, manifest, chunks)
    cancel = threading.Event()
    before: set[int] = set()

    def stop_at_30_percent(d: ChunkDownload) -> None:
        if d.done_count >= 12 and not cancel.is_set():
            before.update(d.partial.done)
            cancel.set()

    first = open_link(mosquitto, f"dev-{prefix}")
    dl = ChunkDownload(
        first,
        topics,
        manifest,
        tmp_path,
        max_bytes=10**6,
        on_progress=stop_at_30_percent,
        cancel=cancel,
    )
    with pytest.raises(DownloadCancelled):
        dl.run()
    first.stop()
    assert len(before) == 12

    second = open_link(mosquitto, f"dev-{prefix}")  # a new process, same files
    try:
        dl = ChunkDownload(second, topics, manifest, tmp_path, max_bytes=10**6)
        assert dl.run().read_bytes() == data
    finally:
        second.stop()
    assert dl.resumed == 12
    assert not set(dl.received) & before, "a finished chunk was fetched again"
    assert sorted(set(dl.received)) == sorted(set(range(CHUNKS)) - before)


def test_broker_restart_mid_download_resumes(own_mosquitto, publisher_for, prefix, tmp_path):
    topics = Topics(prefix)
    data, manifest, chunks = make_file()
    put_chunks(publisher_for(own_mosquitto), topics, manifest, chunks)
    link = open_link(own_mosquitto, f"dev-{prefix}")
    before: set[int] = set()
    mark: list[int] = []

    def restart_broker(d: ChunkDownload) -> None:
        if not mark and d.done_count >= 12:
            time.sleep(0.3)  # let the link acknowledge what it already received
            before.update(d.partial.done)
            mark.append(len(d.received))
            own_mosquitto.restart(down_s=0.5)

    try:
        dl = ChunkDownload(
            link, topics, manifest, tmp_path, max_bytes=10**6, window=4, on_progress=restart_broker
        )
        assert dl.run().read_bytes() == data
    finally:
        link.stop()
    assert link.connects == 2
    assert mark and not set(dl.received[mark[0] :]) & before, "a finished chunk was fetched again"


def test_corrupted_chunk_is_refused_and_good_chunks_are_kept(link, publisher, prefix, tmp_path):
    topics = Topics(prefix)
    data, manifest, chunks = make_file()
    put_chunks(publisher, topics, manifest, chunks)
    bad = bytearray(chunks[5])
    bad[10] ^= 0xFF
    publisher.put(topics.chunk(manifest.name, manifest.version, 5), bytes(bad))
    dl = ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6, window=1)
    with pytest.raises(VerifyError, match="chunk 5 does not match"):
        dl.run()
    assert dl.done_count == 5  # chunks 0-4 kept on disk

    publisher.put(topics.chunk(manifest.name, manifest.version, 5), chunks[5])  # host repairs it
    dl = ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6)
    assert dl.run().read_bytes() == data
    assert dl.resumed == 5 and min(dl.received) == 5


def test_oversized_model_is_refused_before_any_download(link, prefix, tmp_path):
    _, manifest, _ = make_file()
    with pytest.raises(VerifyError, match="over this device's limit"):
        ChunkDownload(link, Topics(prefix), manifest, tmp_path, max_bytes=manifest.size - 1)
    assert list(tmp_path.iterdir()) == []


def test_missing_chunks_time_out_and_keep_what_arrived(link, publisher, prefix, tmp_path):
    topics = Topics(prefix)
    _, manifest, chunks = make_file()
    put_chunks(publisher, topics, manifest, chunks, only=range(10))
    dl = ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6, chunk_timeout_s=1.0)
    with pytest.raises(DownloadError, match="no chunk arrived for 1s"):
        dl.run()
    assert dl.done_count == 10
    partial = PartialFile(tmp_path, manifest)
    partial.open()
    assert partial.done == set(range(10))  # the bitmap on disk says so too
    partial.close()


def test_damaged_partial_file_refetches_only_the_damaged_chunk(link, publisher, prefix, tmp_path):
    topics = Topics(prefix)
    data, manifest, chunks = make_file()
    put_chunks(publisher, topics, manifest, chunks)
    path = ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6).run()
    with open(path, "r+b") as f:  # bit rot in chunk 7
        f.seek(7 * CHUNK + 3)
        f.write(b"\0\0\0")
    dl = ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6)
    assert dl.run().read_bytes() == data
    assert dl.received == [7]


def test_whole_file_mismatch_discards_the_download(link, publisher, prefix, tmp_path):
    topics = Topics(prefix)
    _, manifest, chunks = make_file()
    put_chunks(publisher, topics, manifest, chunks)
    manifest.sha256 = "0" * 64  # chunk hashes right, file hash wrong
    dl = ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6)
    with pytest.raises(VerifyError, match="assembled file does not match"):
        dl.run()
    assert list(Path(tmp_path).iterdir()) == []


def test_a_failing_preallocation_leaks_no_file_descriptor(link, prefix, tmp_path):
    _, manifest, _ = make_file()
    huge = replace(manifest, size=1 << 50)  # more than any test disk: fallocate fails
    download = ChunkDownload(link, Topics(prefix), huge, tmp_path, max_bytes=huge.size)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):  # as the daemon's retries would
        with pytest.raises(OSError):
            download.run()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_whole_download_resumed_on_a_full_disk_needs_no_write(
    link, publisher, prefix, tmp_path, monkeypatch
):
    # an install that failed on a full disk keeps the download; the retry resumed it and
    # rewrote its unchanged bitmap, which a full disk refused: "download: No space left"
    topics = Topics(prefix)
    data, manifest, chunks = make_file()
    put_chunks(publisher, topics, manifest, chunks)
    ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6).run()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "atomic_write_bytes", no_space)
    again = ChunkDownload(link, topics, manifest, tmp_path, max_bytes=10**6)
    assert again.run().read_bytes() == data
    assert again.resumed == again.total
