"""Memory of a process tree, and the size and duration figures users write on the command line.

:func:`tree_rss` is the resident set of a process plus what its descendants hold
privately; :func:`tree_private` counts only private pages, the memory a forked child
adds (pages it still shares with its parent, copy-on-write, cost nothing new: charging
them made every child of a process that had imported torch look 400 MiB big).
:class:`PeakTreeRSS` samples it in a background thread: the figure a benchmark
reports for a whole ``slimfleet compress`` run::

    with PeakTreeRSS(proc.pid) as peak:
        proc.wait()
    print(format_bytes(peak.bytes))

The search itself never starts threads (its children are forked): it samples the tree
from the loop that supervises each child (:mod:`slimfleet.host.compress.isolation`).
"""

from __future__ import annotations

import os
import re
import threading
from types import TracebackType

import psutil

from slimfleet.agent.errors import InputError

GIB = 1 << 30
DEFAULT_MAX_MEMORY = 4 * GIB
"""``--max-memory`` default: the whole process tree of a search stays below it."""
MIN_MAX_MEMORY = 512 << 20
"""The smallest ``--max-memory`` accepted: the search's own process (Python, onnx,
onnxruntime) takes about 350 MiB before it loads a model."""
DEFAULT_TIME_BUDGET = 300.0
"""``--time-budget`` default in seconds."""
SAMPLE_INTERVAL = 0.02
"""Seconds between two samples of a tree's RSS."""

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _tree(pid: int | None) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid if pid is not None else os.getpid())
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _private(proc: psutil.Process) -> int:
    """Bytes only ``proc`` maps (USS); its RSS where the platform cannot tell."""
    try:
        return int(proc.memory_full_info().uss)
    except psutil.AccessDenied:
        return int(proc.memory_info().rss)


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of process ``pid`` (default: this one) plus the private bytes of all
    its descendants: what the whole tree holds, each shared page counted once at the root.

    Processes that exit while being read are skipped; 0 when ``pid`` itself is gone.
    """
    procs = _tree(pid)
    total = 0
    for index, proc in enumerate(procs):
        try:
            total += int(proc.memory_info().rss) if index == 0 else _private(proc)
        except psutil.Error:
            continue
    return total


def tree_private(pid: int) -> int:
    """Private bytes of ``pid`` and all its descendants: the memory the tree adds to what
    its parent already holds (the measure the children's memory limit applies to)."""
    total = 0
    for proc in _tree(pid):
        try:
            total += _private(proc)
        except psutil.Error:
            continue
    return total


class PeakTreeRSS:
    """Samples :func:`tree_rss` of ``pid`` every ``interval`` seconds while in the block.

    ``bytes`` holds the highest sample (one last sample is taken on exit). Lock: none;
    ``bytes`` is written only by the sampling thread until :meth:`__exit__` joins it.
    """

    def __init__(self, pid: int | None = None, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid = pid if pid is not None else os.getpid()
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-tree-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_rss(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakTreeRSS:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def format_bytes(value: float) -> str:
    """``4294967296`` -> ``"4.0 GiB"``; ``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


MAX_BYTES = 1024**5
"""Sizes above 1 PiB are typing mistakes (and overflow the kernel's address-space limit)."""


def parse_bytes(text: str, option: str = "--max-memory") -> int:
    """``"4GiB"``, ``"4G"``, ``"512MiB"``, ``"1.5g"`` or plain bytes -> bytes (powers of
    1024), at most :data:`MAX_BYTES`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match or float(match[1]) <= 0:
        raise InputError(f"{option} {text!r}: expected a size such as 4GiB, 512MiB or 2G")
    size = float(match[1]) * _UNITS[match[2]]
    if size > MAX_BYTES:
        raise InputError(f"{option} {text!r}: at most 1 PiB")
    return int(size)
