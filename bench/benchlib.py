"""What compress_bench and corpus_bench share: sessions, timing, bounded child processes
with peak-RSS sampling, running ``slimfleet compress`` as a user does, and the table.

Every ratio in the tables is written one way: original / variant, so ``3.80x`` under
"smaller" means a quarter of the size and ``2.10x`` under "faster" means under half the
latency; a value below 1 is a loss.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil

from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.modelfile import total_size

Feed = dict[str, np.ndarray]
GIB = 1 << 30
SAMPLE_EVERY = 0.2
"""Seconds between two RSS samples of a watched process tree."""


def session(path: Path):
    """A one-thread, sequential CPU session: the options the agent serves with."""
    return open_session(path, 1)


T = TypeVar("T")


def read_right(drawn: Iterable[tuple[str, T]], read: Callable[[T], str], count: int):
    """The first ``count`` inputs of ``drawn`` (``(text, input)`` pairs) whose text
    ``read`` (the fp32 model's reading) gets right, and how many were drawn to find them
    (fewer kept when ``drawn`` runs out): the captchas a user relies on the model for."""
    kept: list[T] = []
    tried = 0
    for text, item in drawn:
        tried += 1
        if read(item) == text:
            kept.append(item)
            if len(kept) == count:
                break
    return kept, tried


def outputs_of(path: Path, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Every output of the model at ``path`` for each feed."""
    s = session(path)
    return [s.run(None, feed) for feed in feeds]


def latencies_ms(
    paths: Mapping[str, Path], feeds: Sequence[Feed], rounds: int, budget_s: float = 60.0
) -> dict[str, float]:
    """Median latency per model, timing one run of each in turn (interleaved, so machine
    load hits all alike), ``rounds`` times or fewer when that would exceed ``budget_s``."""
    sessions = {label: session(path) for label, path in paths.items()}
    one_round = 0.0
    for s in sessions.values():
        for feed in feeds[:3]:
            started = time.perf_counter()
            s.run(None, feed)
        one_round += time.perf_counter() - started
    rounds = max(5, min(rounds, int(budget_s / max(one_round, 1e-6))))
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for i in range(rounds):
        feed = feeds[i % len(feeds)]
        for label, s in sessions.items():
            started = time.perf_counter()
            s.run(None, feed)
            times[label].append(time.perf_counter() - started)
    return {label: 1000 * float(np.median(t)) for label, t in times.items()}


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of ``process`` and all its descendants (0 once it is gone)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


@dataclass
class Watched:
    """How a watched child ended: ``error`` is None when it exited 0."""

    peak_rss: int
    seconds: float
    error: str | None


def watch(pid: int, *, timeout_s: float, max_rss: int, exited: Callable[[], int | None]) -> Watched:
    """Sample the tree under ``pid`` until ``exited()`` returns its exit code; kill the
    tree past ``timeout_s`` seconds or ``max_rss`` bytes and say which."""
    process = psutil.Process(pid)
    started = time.monotonic()
    peak, error = 0, None
    while (code := exited()) is None:
        peak = max(peak, tree_rss(process))
        elapsed = time.monotonic() - started
        if peak > max_rss or elapsed > timeout_s:
            error = (
                f"killed at {peak / GIB:.1f} GiB RSS (limit {max_rss / GIB:.1f} GiB)"
                if peak > max_rss
                else f"killed after {elapsed:.0f} s (limit {timeout_s:.0f} s)"
            )
            _kill_tree(process)
            while exited() is None:
                time.sleep(SAMPLE_EVERY)
            break
        time.sleep(SAMPLE_EVERY)
    else:
        if code:
            error = f"exit code {code}"
    return Watched(peak, time.monotonic() - started, error)


def _kill_tree(process: psutil.Process) -> None:
    try:
        members = [*process.children(recursive=True), process]
    except psutil.NoSuchProcess:
        return
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def run_bounded(fn: Callable[[], None], *, timeout_s: float, max_rss: int) -> Watched:
    """Run ``fn`` in a forked child (it sees this process's data) under the bounds of
    :func:`watch`; an exception in ``fn`` becomes ``error``, its last line."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def child() -> None:
        try:
            fn()
            writer.send(None)
        except BaseException as exc:
            lines = traceback.format_exception_only(exc)
            writer.send(" ".join(lines[-1].split())[:300])

    process = context.Process(target=child, daemon=True)
    process.start()
    watched = watch(
        process.pid, timeout_s=timeout_s, max_rss=max_rss, exited=lambda: process.exitcode
    )
    process.join()
    if reader.poll():
        watched.error = reader.recv() or watched.error
    return watched


def write_samples(feeds: Sequence[Feed], directory: Path) -> Path:
    """One ``.npz`` per sample (``slimfleet compress --data DIR``): works for every input
    kind, including fixed-batch, 1-d and scalar inputs."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(directory / f"{i:05d}.npz", **feed)
    return directory


def slimfleet_command() -> list[str]:
    """The installed ``slimfleet`` console script beside this interpreter."""
    script = Path(sys.executable).parent / "slimfleet"
    return [str(script)] if script.exists() else [shutil.which("slimfleet") or "slimfleet"]


@dataclass
class CompressRun:
    """``slimfleet compress`` as a user runs it: its outcome, peak RSS of the whole tree."""

    model: Path | None
    """The chosen ``model.onnx``, or None when compress failed."""
    watched: Watched
    choice: str
    report: dict = field(default_factory=dict)


def run_compress(
    model: Path,
    data: Path,
    outdir: Path,
    *,
    timeout_s: float,
    max_rss: int,
    extra_args: Sequence[str] = (),
) -> CompressRun:
    """Run ``slimfleet compress MODEL -o OUTDIR --data DATA --json`` with defaults."""
    command = [*slimfleet_command(), "compress", str(model), "-o", str(outdir)]
    command += ["--data", str(data), "--json", *extra_args]
    log_path = outdir.with_suffix(".stderr.txt")
    with open(log_path, "w") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        chunks: list[str] = []
        reader = _drain(child, chunks)
        watched = watch(child.pid, timeout_s=timeout_s, max_rss=max_rss, exited=child.poll)
        reader.join()
    stdout = "".join(chunks)
    if watched.error:
        lines = log_path.read_text(errors="replace").strip().splitlines()
        last = lines[-1].strip() if lines else ""
        watched.error = f"{watched.error}: {last[:240]}" if last else watched.error
        return CompressRun(None, watched, "-")
    try:
        doc = json.loads(stdout)
    except json.JSONDecodeError:
        watched.error = f"--json printed no JSON: {stdout.strip()[:120]!r}"
        return CompressRun(None, watched, "-")
    report_path = outdir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return CompressRun(outdir / "model.onnx", watched, _choice(doc), report)


def _drain(child: subprocess.Popen, chunks: list[str]):
    import threading

    thread = threading.Thread(target=lambda: chunks.append(child.stdout.read()), daemon=True)
    thread.start()
    return thread


def _choice(doc: dict) -> str:
    summary = doc.get("summary") or {}
    return str(summary.get("chosen") or doc.get("choice") or "?")


@dataclass
class Row:
    """One line of a table: a model variant measured on the held-out samples."""

    model: str
    variant: str
    size_mb: float | None = None
    latency_ms: float | None = None
    scores: list[str] = field(default_factory=list)
    """Task metrics, each already shown with its count (``Score.show``)."""
    peak_rss: int | None = None
    seconds: float | None = None
    choice: str = ""
    error: str | None = None


def ratio(base: float | None, value: float | None) -> str:
    if not base or not value:
        return "-"
    return f"{base / value:.2f}x"


def format_table(rows: Sequence[Row]) -> list[str]:
    """Fixed-width lines; each model's first row is its original, the base of its ratios."""
    width = max([len("model"), *(len(row.model) for row in rows)]) + 2
    header = (
        f"{'model':<{width}}{'variant':<22}{'smaller':>8}{'faster':>8}{'size MB':>9}"
        f"{'lat ms':>9}{'peak RSS':>10}{'wall s':>8}  task metric (held-out) / choice"
    )
    lines = [header]
    base: Row | None = None
    for row in rows:
        if base is None or row.model != base.model:
            base = row
        if row.error:
            lines.append(f"{row.model:<{width}}{row.variant:<22}FAILED: {row.error}")
            continue
        rss = f"{row.peak_rss / GIB:.2f}G" if row.peak_rss else "-"
        wall = f"{row.seconds:.0f}" if row.seconds is not None else "-"
        size = f"{row.size_mb:.4g}" if row.size_mb is not None else "-"
        lat = f"{row.latency_ms:.2f}" if row.latency_ms is not None else "-"
        tail = "; ".join(row.scores)
        if row.choice:
            tail += f"  [{row.choice}]"
        lines.append(
            f"{row.model:<{width}}{row.variant:<22}{ratio(base.size_mb, row.size_mb):>8}"
            f"{ratio(base.latency_ms, row.latency_ms):>8}{size:>9}{lat:>9}{rss:>10}{wall:>8}"
            f"  {tail}"
        )
    return lines


def size_mb(path: Path) -> float:
    """The model file plus every external-data file it refers to, in MB."""
    return total_size(path) / 1e6


def cpu_note() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, load average {load:.1f} at start (shared machine)"
