"""ModelStore: versioned files and state on a real file system, including crashes."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from slimfleet.agent.deployment import SlotSpec
from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.store import AgentState, ModelStore, StateFile, atomic_write_bytes
from slimfleet.agent.wire import ModelRef


def ref(name: str, version: int) -> ModelRef:
    return ModelRef(name, version)


def download(folder: Path, data: bytes) -> Path:
    """A finished download, as the downloader leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dl-{len(list(folder.iterdir()))}"
    path.write_bytes(data)
    return path


def only(*refs: ModelRef) -> dict[str, SlotSpec]:
    """A one-slot deployment of ``refs`` (tiers)."""
    return {"main": SlotSpec(tuple(refs))}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


# -- ModelRef / AgentState ------------------------------------------------------------


def test_model_refs_order_by_version_within_a_name() -> None:
    assert sorted([ref("m", 10), ref("m", 2), ref("m", 1)]) == [
        ref("m", 1),
        ref("m", 2),
        ref("m", 10),
    ]
    assert ref("m", 2) > ref("m", 1)
    assert str(ref("ocr", 3)) == "ocr@3"
    assert ModelRef.parse("ocr.v2@12") == ref("ocr.v2", 12)
    assert ModelRef.from_dict(ref("m", 4).to_dict()) == ref("m", 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ModelRef("m", 0),
        lambda: ModelRef("m", True),
        lambda: ModelRef("m", "3"),
        lambda: ModelRef("a/b", 1),
        lambda: ModelRef("", 1),
        lambda: ModelRef("..", 3),  # would resolve outside models/
        lambda: ModelRef(".", 3),
        lambda: ModelRef.parse("m"),
        lambda: ModelRef.parse("m@x"),
        lambda: ModelRef.from_dict(["m", 1]),
        lambda: ModelRef.from_dict({"name": "m"}),
    ],
)
def test_invalid_model_refs_are_refused(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_state_round_trips() -> None:
    state = AgentState(
        current={"det": SlotSpec((ref("d", 3),)), "rec": SlotSpec((ref("r", 2), ref("r", 1)))},
        last_good=only(ref("m", 2)),
        previous=None,
        floor=7,
        enrolled=1765000000.5,
    )
    assert AgentState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert state.refs() == [ref("d", 3), ref("r", 2), ref("r", 1), ref("m", 2)]


# -- models ---------------------------------------------------------------------------


def test_install_puts_both_files_in_the_versioned_folder(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    source = download(store.partial_dir(), b"model-bytes")
    path = store.install(ref("m", 1), source, b'{"signed": {}}')
    assert path == tmp_path / "store/models/m/1/model.onnx" == store.model_path(ref("m", 1))
    assert path.read_bytes() == b"model-bytes"
    assert store.read_manifest(ref("m", 1)) == b'{"signed": {}}'
    assert store.has(ref("m", 1)) and not store.has(ref("m", 2))
    assert not source.exists(), "a download is moved into the store, not copied"
    assert store.installed() == [ref("m", 1)]
    assert leftovers(tmp_path) == []


def test_install_can_copy_and_versions_are_immutable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    source = download(tmp_path / "elsewhere", b"first")
    store.install(ref("m", 1), source, b"manifest-1", move=False)
    assert source.read_bytes() == b"first"
    second = download(tmp_path / "elsewhere", b"second")
    with pytest.raises(SlimfleetError, match="m@1 is already installed"):
        store.install(ref("m", 1), second, b"manifest-2")
    assert store.model_path(ref("m", 1)).read_bytes() == b"first"
    store.remove(ref("m", 1))
    assert not store.has(ref("m", 1))
    store.install(ref("m", 1), second, b"manifest-2")
    assert store.model_path(ref("m", 1)).read_bytes() == b"second"
    assert store.read_manifest(ref("m", 1)) == b"manifest-2"
    assert leftovers(tmp_path) == []


def test_a_failed_install_leaves_nothing_behind(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(SlimfleetError, match=r"m@1: cannot install"):
        store.install(ref("m", 1), tmp_path / "no-such-download", b"manifest")
    assert not store.has(ref("m", 1))
    assert store.installed() == []
    assert leftovers(tmp_path) == []


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", keep=2)
    for version in range(1, 6):
        store.install(ref("m", version), download(tmp_path / "dl", b"m"), b"{}")
    store.install(ref("other", 1), download(tmp_path / "dl", b"o"), b"{}")
    removed = store.prune(protect=[ref("m", 1)])
    assert removed == [ref("m", 3), ref("m", 2)]
    assert store.installed() == [ref("m", 1), ref("m", 4), ref("m", 5), ref("other", 1)]
    assert (
        store.prune(AgentState(current=only(ref("m", 5)), last_good=only(ref("m", 1))).refs()) == []
    )
    assert sorted(p.name for p in (tmp_path / "store/models/m").iterdir()) == ["1", "4", "5"]


def test_temporaries_left_by_a_crash_are_removed_at_open(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.install(ref("m", 1), download(tmp_path / "dl", b"x"), b"{}")
    half = tmp_path / "store/models/m/.tmp-2.abcd"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"half a mod")
    (tmp_path / "store/.tmp-state.json.xyz").write_text('{"curr')
    # a bitmap being replaced by the downloader (atomic_write_bytes in partial/)
    (store.partial_dir() / "m-2-0123456789abcdef.bitmap").write_text("{}")
    (store.partial_dir() / ".tmp-m-2-0123456789abcdef.bitmap.k3x9").write_text('{"do')
    (tmp_path / "store/models/not a name/1").mkdir(parents=True)  # put there by hand
    assert store.installed() == [ref("m", 1)]  # a temporary is never a version
    ModelStore(tmp_path / "store")
    assert leftovers(tmp_path) == []
    assert store.installed() == [ref("m", 1)]
    assert [p.name for p in store.partial_dir().iterdir()] == ["m-2-0123456789abcdef.bitmap"]


def test_an_unusable_root_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SlimfleetError, match="cannot create the model store"):
        ModelStore(tmp_path / "file" / "store")


# -- state ------------------------------------------------------------------------------


def test_state_is_saved_and_loaded(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    state = AgentState(
        current=only(ref("m", 2)), last_good=only(ref("m", 2)), previous=only(ref("m", 1)), floor=3
    )
    store.save_state(state)
    assert ModelStore(tmp_path).load_state() == state
    saved = json.loads(store.state_path.read_text())
    assert saved["previous"] == {"main": {"models": [{"name": "m", "version": 1}]}}
    assert saved["floor"] == 3 and saved["schema"] == 2


def test_a_missing_state_is_none(tmp_path: Path) -> None:
    assert ModelStore(tmp_path).load_state() is None


@pytest.mark.parametrize(
    "content",
    [
        b'{"schema": 2, "current": {"main": {"models": [{"name": "m", "vers',
        b"\xff\xfe",
        b"[1, 2]",
        b'{"schema": 2, "current": {"main": {"models": [{"name": "m"}]}}, "floor": 1, '
        b'"enrolled": 1}',
        b'{"schema": 2, "current": null, "floor": -1, "enrolled": 1}',
        b'{"schema": 2, "current": null, "floor": 1, "enrolled": "x"}',
        b'{"current": {"name": "m", "version": 1}, "last_good": null}',
    ],
    ids=["truncated", "not-utf8", "not-an-object", "bad-ref", "floor", "enrolled", "schema-1"],
)
def test_a_corrupt_state_is_none_with_a_warning(tmp_path: Path, caplog, content: bytes) -> None:
    store = ModelStore(tmp_path)
    store.state_path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="slimfleet.agent.store"):
        assert store.load_state() is None
    assert "corrupt" in caplog.text
    assert (tmp_path / "state.json.corrupt").read_bytes() == content
    store.save_state(AgentState(current=only(ref("m", 1))))  # and the agent goes on
    assert store.load_state().current == only(ref("m", 1))


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert list(tmp_path.iterdir()) == [target]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # private by default
    atomic_write_bytes(target, b"three", mode=0o640)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 & ~current_umask()


# -- crashes ----------------------------------------------------------------------------

CRASHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from slimfleet.agent.store import AgentState, ModelStore
    from slimfleet.agent.wire import ModelRef
    from slimfleet.agent.deployment import SlotSpec

    store = ModelStore(Path(sys.argv[1]), keep=2)
    data = b"w" * 200_000
    print("ready", flush=True)
    installed = store.installed()
    version = installed[-1].version if installed else 0
    while True:
        version += 1
        ref = ModelRef("m", version)
        source = store.partial_dir() / "download"
        source.write_bytes(data + str(version).encode())
        store.install(ref, source, b'{"v": %d}' % version)
        spec = {"main": SlotSpec((ref,))}
        store.save_state(AgentState(current=spec, last_good=spec, previous=None))
        store.prune(protect=[ref])
    """
)


def test_sigkill_at_any_moment_leaves_a_consistent_store(tmp_path: Path) -> None:
    """Kill a process that installs, saves state and prunes in a loop; reopen each time."""
    root = tmp_path / "store"
    interrupted = 0
    for attempt in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHER, str(root)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raw = (root / "state.json").read_bytes() if (root / "state.json").exists() else None
        interrupted += bool(leftovers(root))
        store = ModelStore(root, keep=2)
        if raw is not None:
            json.loads(raw)  # the state file is never half written
            state = store.load_state()
            assert state.current is not None and all(store.has(r) for r in state.refs())
        for installed in store.installed():
            body = store.model_path(installed).read_bytes()
            assert body == b"w" * 200_000 + str(installed.version).encode()
            assert store.read_manifest(installed) == b'{"v": %d}' % installed.version
        assert leftovers(root) == []
    assert interrupted, "no kill landed in the middle of a write: the test proved nothing"


# -- integrity at rest and a failed install ---------------------------------------------


def test_a_changed_model_file_is_found_and_quarantined(tmp_path: Path) -> None:
    import hashlib

    store = ModelStore(tmp_path / "store")
    data = b"weights" * 1000
    store.install(ref("m", 1), download(tmp_path / "dl", data), b"{}")
    digest = hashlib.sha256(data).hexdigest()
    assert store.check_file(ref("m", 1), digest, len(data)) is None
    path = store.model_path(ref("m", 1))
    path.write_bytes(data[:-1] + b"X")  # one byte edited, same size
    reason = store.check_file(ref("m", 1), digest, len(data))
    assert reason is not None and "does not match its signed manifest" in reason
    moved = store.quarantine(ref("m", 1))
    assert not store.has(ref("m", 1)) and store.installed() == []
    assert moved is not None and (moved / "model.onnx").read_bytes().endswith(b"X")
    for version in range(2, 8):  # the quarantine keeps only the newest few
        store.install(ref("m", version), download(tmp_path / "dl", data), b"{}")
        store.quarantine(ref("m", version))
    assert len(list((tmp_path / "store" / "quarantine").iterdir())) == 4


EFBIG_INSTALL = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from slimfleet.agent.errors import SlimfleetError
    from slimfleet.agent.store import ModelStore
    from slimfleet.agent.wire import ModelRef

    store = ModelStore(Path(sys.argv[1]))
    source = Path(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # the manifest is bigger than this
    try:
        store.install(ModelRef("m", 1), source, b"m" * 4096)
    except SlimfleetError as exc:
        print(exc)
        sys.exit(3)
    """
)


def test_an_install_that_fails_with_efbig_keeps_the_download(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    source = store.partial_dir() / "m-1.part"
    source.write_bytes(b"the downloaded model" * 1000)
    proc = subprocess.run(
        [sys.executable, "-c", EFBIG_INSTALL, str(store.root), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert "File too large" in proc.stdout
    assert source.read_bytes() == b"the downloaded model" * 1000  # kept for the retry
    assert not store.has(ModelRef("m", 1)) and leftovers(store.root) == []
    store.install(ModelRef("m", 1), source, b"m" * 4096)  # the retry, with room
    assert store.model_path(ModelRef("m", 1)).read_bytes() == b"the downloaded model" * 1000


def test_state_file_goes_on_from_memory_and_writes_again_on_a_timer(tmp_path, monkeypatch):
    # a full disk at the end of a watch window (a serving thread's write) was never
    # retried: state.json kept the old last_good until the next desired state
    store = ModelStore(tmp_path / "store")
    due = threading.Event()
    state_file = StateFile(store, None, due.set)
    monkeypatch.setattr(StateFile, "RETRY_S", 0.05)
    real_save = ModelStore.save_state

    def no_space(self, state):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelStore, "save_state", no_space)
    state = AgentState(floor=3)
    results = []
    writer = threading.Thread(target=lambda: results.append(state_file.save(state)))
    writer.start()
    writer.join()
    assert results == [False] and store.load_state() is None
    assert due.wait(5), "no retry was scheduled"
    monkeypatch.setattr(ModelStore, "save_state", real_save)
    assert state_file.save(state) and store.load_state() == state
    assert state_file.error is None
    state_file.close()
