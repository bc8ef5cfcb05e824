"""isolation: a child that crashes, hangs, eats memory or raises is a one-line outcome."""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np
import psutil
import pytest

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress import isolation
from slimfleet.host.compress.isolation import Limits

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and POSIX signals")

MIB = 1 << 20


def _segfault() -> None:
    ctypes.string_at(0)


def _hang() -> None:
    time.sleep(60)


def _hog(mib: int) -> int:
    chunks = []
    for _ in range(mib):
        chunks.append(np.ones(MIB, np.uint8))  # touched: resident
    return len(chunks)


def _hog_in_grandchild(mib: int) -> int:
    """The memory is taken by a process the child starts: the tree is what counts."""
    pid = os.fork()
    if pid == 0:
        _hog(mib)
        time.sleep(60)
        os._exit(0)
    os.waitpid(pid, 0)
    return 0


def _raise(message: str) -> None:
    raise SlimfleetError(message)


def test_a_value_comes_back(tmp_path):
    outcome = isolation.call(sum, [1, 2, 3], limits=Limits(10), workdir=tmp_path)
    assert outcome.ok and outcome.value == 6 and outcome.kind is None
    assert outcome.peak_rss >= 0 and outcome.seconds > 0


def test_a_segfault_is_a_crash(tmp_path):
    outcome = isolation.call(_segfault, limits=Limits(10), workdir=tmp_path)
    assert (outcome.kind, outcome.failure) == (isolation.CRASH, "crashed: SIGSEGV")


def test_a_hang_is_a_timeout_and_the_child_is_gone(tmp_path):
    before = _children()
    started = time.monotonic()
    outcome = isolation.call(_hang, limits=Limits(0.3), workdir=tmp_path)
    assert (outcome.kind, outcome.failure) == (isolation.TIMEOUT, "timed out after 0.3 s")
    assert time.monotonic() - started < 5
    assert _children() <= before


def test_memory_over_the_limit_is_killed(tmp_path):
    outcome = isolation.call(_hog, 2000, limits=Limits(30, 200 * MIB), workdir=tmp_path)
    assert outcome.kind == isolation.MEMORY
    assert outcome.failure.startswith("killed at ") and outcome.failure.endswith(
        "(limit 200.0 MiB)"
    )
    assert outcome.peak_rss > 200 * MIB


def test_memory_of_the_whole_tree_counts(tmp_path):
    before = _children()
    outcome = isolation.call(
        _hog_in_grandchild, 2000, limits=Limits(30, 200 * MIB), workdir=tmp_path
    )
    assert outcome.kind == isolation.MEMORY
    assert _children() <= before  # the grandchild went too


def test_within_the_limit_is_fine(tmp_path):
    outcome = isolation.call(_hog, 20, limits=Limits(30, 1 << 30), workdir=tmp_path)
    assert outcome.ok and outcome.value == 20


def test_an_exception_is_one_line(tmp_path):
    outcome = isolation.call(_raise, "no good\nat all", limits=Limits(10), workdir=tmp_path)
    assert (outcome.kind, outcome.failure) == (isolation.ERROR, "no good")
    outcome = isolation.call(int, "x", limits=Limits(10), workdir=tmp_path)
    assert outcome.failure == "ValueError: invalid literal for int() with base 10: 'x'"


def test_a_memory_error_says_out_of_memory(tmp_path):
    def allocate() -> None:
        raise MemoryError()

    outcome = isolation.call(allocate, limits=Limits(10), workdir=tmp_path)
    assert outcome.failure == "out of memory (MemoryError)"


def test_the_address_space_limit_stops_one_huge_allocation_at_once(tmp_path):
    """20 GiB asked in one go with a 100 MiB limit: the rlimit refuses it (no wait for RSS)."""

    def huge() -> None:
        np.ones(20 << 30, np.uint8)

    outcome = isolation.call(huge, limits=Limits(30, 100 * MIB), workdir=tmp_path)
    assert outcome.kind == isolation.ERROR and outcome.failure.startswith("out of memory")


def test_a_module_child_reports_its_json_result(tmp_path):
    job = {"kind": "race", "models": [], "samples": [str(tmp_path / "missing.npz")]}
    job["settings"] = {}
    outcome = isolation.run_module(
        "slimfleet.host.compress.worker", job, limits=Limits(30), workdir=tmp_path
    )
    assert outcome.kind == isolation.ERROR and "missing.npz" in outcome.failure


def test_a_module_that_dies_gives_its_last_stderr_line(tmp_path):
    outcome = isolation.run_module(
        "slimfleet.no_such_module", {}, limits=Limits(30), workdir=tmp_path
    )
    assert outcome.kind == isolation.CRASH
    assert outcome.failure.startswith("the evaluation process exited with code 1: ")
    assert "No module named slimfleet.no_such_module" in outcome.failure


def test_the_tree_peak_includes_the_parent(tmp_path):
    isolation.TREE_PEAK.reset()
    isolation.call(_hog, 50, limits=Limits(30), workdir=tmp_path)
    parent = psutil.Process().memory_info().rss
    assert isolation.TREE_PEAK.bytes >= parent


def _children() -> set[int]:
    """This process's descendants (other tests' fixtures, such as a broker, may be among them)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}
