"""Run one piece of work in a child process under a timeout and a memory limit.

A pass that segfaults, hangs or eats memory must become a row in the report, never the
end of the search. Both ways of starting a child share one supervisor:

* :func:`call` forks: the child runs ``fn(*args)`` with everything the parent holds (the
  plugin manager, passes registered in-process, the original model) and pickles the
  value back. Passes and the fallback's analysis run this way.
* :func:`run_module` starts a fresh interpreter (``python -m MODULE JOB.json``) that
  imports only what it needs, so what it measures (load time, memory) is its own. The
  evaluation's worker runs this way; the module writes its JSON result to
  ``job["result"]``.

The supervisor waits for the child, sampling the private memory (USS) of the child's
whole tree every 20 ms: pages a forked child still shares with its parent are not new
memory and are not charged. Over ``Limits.memory`` it kills the tree ("killed at 4.1 GiB (limit 4.0 GiB)");
past ``Limits.timeout`` too ("timed out after 300 s"); a signal shows as "crashed:
SIGSEGV". The child also gets an address-space rlimit of ``ADDRESS_SPACE_FACTOR`` times
the memory limit on top of the address space it starts with: onnxruntime and onnxsim reserve address space well beyond what they
touch (measured: 1.1 GiB of address space for 0.8 GiB resident on u2net), so the
rlimit only stops a single runaway allocation the sampler would see too late, and the
RSS watchdog is what enforces the limit. Linux and macOS (needs ``fork``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimfleet.host.compress.resources import SAMPLE_INTERVAL, format_bytes, tree_private

ADDRESS_SPACE_FACTOR = 3
"""The child's RLIMIT_AS is this many times its memory limit (see the module docstring)."""
MIN_ADDRESS_SPACE = 2 << 30
"""...and never below 2 GiB, what onnxruntime reserves on start-up with a few threads."""
TIMEOUT = "timeout"
MEMORY = "memory"
CRASH = "crash"
ERROR = "error"
"""Outcome kinds: the child ran too long, used too much memory, died of a signal or an
exit code, or raised (``failure`` then names the exception)."""


@dataclass(frozen=True)
class Limits:
    """What one child may use: seconds of wall time, bytes of tree RSS (None: no limit)."""

    timeout: float
    memory: int | None = None


@dataclass
class Outcome:
    """The child's return value, or a one-line ``failure`` of kind ``kind``."""

    value: Any = None
    failure: str | None = None
    kind: str | None = None
    peak_rss: int = 0
    """The highest sampled RSS of the child's tree (bytes)."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None


class _TreePeak:
    """The highest RSS of this process plus a supervised child's tree, over all children
    supervised since :meth:`reset`. Lock: none (written only by the supervising thread)."""

    def __init__(self) -> None:
        self.bytes = 0

    def reset(self) -> None:
        self.bytes = 0

    def see(self, child_tree: int) -> None:
        self.bytes = max(self.bytes, child_tree + _own_rss())


TREE_PEAK = _TreePeak()
"""What a search reports as its peak tree RSS (parent and child counted together)."""


def _own_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class _Supervised:
    """A started child: its pid, and how to ask whether it has exited."""

    def __init__(self, pid: int, poll: Callable[[], int | None]) -> None:
        self.pid = pid
        self.poll = poll


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, MemoryError) or "bad_alloc" in text or "Failed to allocate" in text:
        return f"out of memory ({type(exc).__name__}{': ' + first if first else ''})"
    from slimfleet.agent.errors import SlimfleetError

    if isinstance(exc, SlimfleetError) and first:
        return first
    return f"{type(exc).__name__}: {first or 'no message'}"


def _mapped_now() -> int:
    """This process's address space in bytes (VmSize); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_address_space(memory: int | None) -> None:
    if memory is None:
        return
    try:
        import resource

        # on top of what the child already maps: a child forked from a process that
        # imported torch starts with gigabytes of address space it never touches
        limit = _mapped_now() + max(MIN_ADDRESS_SPACE, memory * ADDRESS_SPACE_FACTOR)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed
        pass


def call(fn: Callable[..., Any], *args: Any, limits: Limits, workdir: Path) -> Outcome:
    """Run ``fn(*args)`` in a forked child; its (picklable) value or a failure.

    An exception in ``fn`` comes back as a failure of kind ``error`` with a one-line
    message (``SlimfleetError`` text as is, others prefixed with their type).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / "result.pickle"
    result.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        code = 0
        try:
            os.setpgid(0, 0)
            _limit_address_space(limits.memory)
            try:
                payload: tuple[str, Any] = ("value", fn(*args))
            except BaseException as exc:  # everything becomes the parent's one line
                payload = ("error", _one_line(exc))
            _write_atomically(result, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)

    with contextlib.suppress(OSError):  # also from this side: no window before killpg works
        os.setpgid(pid, pid)

    def poll() -> int | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None

    outcome = _supervise(_Supervised(pid, poll), limits, "the pass process")
    if outcome.failure is None:
        kind, value = pickle.loads(result.read_bytes())
        if kind == "error":
            outcome.failure, outcome.kind = value, ERROR
        else:
            outcome.value = value
    result.unlink(missing_ok=True)
    return outcome


def run_module(module: str, job: dict[str, Any], *, limits: Limits, workdir: Path) -> Outcome:
    """Run ``python -m module JOB`` on the JSON ``job``; its JSON result or a failure.

    The module reads the job file named by its first argument and writes its result as
    JSON to ``job["result"]`` (a result ``{"error": text}`` is a failure of kind ``error``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str(workdir / "result.json")}
    job_path, stderr_path = workdir / "job.json", workdir / "stderr.txt"
    job_path.write_text(json.dumps(job))
    result = Path(job["result"])
    result.unlink(missing_ok=True)
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(job_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=lambda: _limit_address_space(limits.memory),
        )
        outcome = _supervise(_Supervised(proc.pid, proc.poll), limits, "the evaluation process")
    if outcome.failure is None and not result.exists():
        outcome.failure, outcome.kind = "the evaluation process wrote no result", CRASH
    if outcome.failure is not None:
        if outcome.kind == CRASH:
            outcome.failure = _with_last_line(outcome.failure, stderr_path)
        return outcome
    value = json.loads(result.read_text())
    if isinstance(value, dict) and value.get("error"):
        outcome.failure, outcome.kind = str(value["error"]), ERROR
    else:
        outcome.value = value
    return outcome


def _supervise(child: _Supervised, limits: Limits, what: str) -> Outcome:
    """Wait for ``child`` within ``limits``; kill its process group when it goes over."""
    started = time.monotonic()
    peak = 0
    interval = SAMPLE_INTERVAL / 4  # short jobs end fast; back off to SAMPLE_INTERVAL
    try:
        while True:
            code = child.poll()
            elapsed = time.monotonic() - started
            if code is not None:
                break
            rss = tree_private(child.pid)
            peak = max(peak, rss)
            TREE_PEAK.see(rss)
            if limits.memory is not None and rss > limits.memory:
                _kill(child)
                return Outcome(
                    failure=f"killed at {format_bytes(rss)} (limit {format_bytes(limits.memory)})",
                    kind=MEMORY,
                    peak_rss=peak,
                    seconds=elapsed,
                )
            if elapsed > limits.timeout:
                _kill(child)
                return Outcome(
                    failure=f"timed out after {limits.timeout:g} s",
                    kind=TIMEOUT,
                    peak_rss=peak,
                    seconds=elapsed,
                )
            time.sleep(interval)
            interval = min(SAMPLE_INTERVAL, interval * 2)
    except BaseException:  # Ctrl-C in the parent: take the child down with us
        _kill(child)
        raise
    outcome = Outcome(peak_rss=peak, seconds=time.monotonic() - started)
    if code < 0:
        outcome.failure, outcome.kind = f"crashed: {_signal_name(-code)}", CRASH
    elif code != 0:
        outcome.failure, outcome.kind = f"{what} exited with code {code}", CRASH
    return outcome


def _kill(child: _Supervised) -> None:
    """SIGKILL the child's process group (it leads its own), then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _with_last_line(failure: str, stderr_path: Path) -> str:
    try:
        lines = [line for line in stderr_path.read_text(errors="replace").splitlines() if line]
    except OSError:
        lines = []
    return f"{failure}: {lines[-1].strip()}" if lines else failure


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(path)
