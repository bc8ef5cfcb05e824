"""The evaluation child process: ``python -m slimfleet.host.compress.worker JOB``.

It reads a job written by :mod:`~slimfleet.host.compress.evaluate`, opens the model with
the agent's session options (:func:`slimfleet.agent.runtime.open_session`, what the
device runs), and writes its result as JSON. It imports only numpy, onnxruntime and
psutil, so it starts in a fraction of a second. Only tensor outputs are fetched: a
``seq(map(...))`` output (scikit-learn's probabilities) cannot be saved or compared.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.host.compress import arrayfiles
from slimfleet.host.compress.arrayfiles import ArrayFiles
from slimfleet.host.compress.evaluate import TOO_SLOW, EvalSettings


def _peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux: ``VmHWM``, which belongs to the process image; ``ru_maxrss`` is no good there
    because it keeps the parent's RSS from before ``exec``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return int(psutil.Process().memory_info().peak_wset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _session(path: str, settings: EvalSettings) -> Any:
    from slimfleet.agent.runtime import open_session

    return open_session(path, settings.threads)


def tensor_outputs(session: Any) -> list[str]:
    """Names of the session's tensor outputs (sequences and maps are left out)."""
    return [o.name for o in session.get_outputs() if o.type.startswith("tensor(")]


def _measure_job(job: dict[str, Any]) -> dict[str, Any]:
    settings = EvalSettings(**job["settings"])
    feeds = ArrayFiles(job["samples"])
    rss_before = _current_rss()
    start = time.perf_counter()
    session = _session(job["model"], settings)
    load_ms = (time.perf_counter() - start) * 1000
    names = tensor_outputs(session)

    def outputs() -> Iterator[dict[str, np.ndarray]]:
        took: list[float] = []
        for feed in feeds:
            started = time.perf_counter()
            values = session.run(names, feed)
            took.append((time.perf_counter() - started) * 1000)
            # The first run warms up; two slow runs in a row are not a passing hiccup.
            fastest = min(took[1:][-2:]) if len(took) >= 3 else 0.0
            if settings.give_up_ms is not None and fastest > settings.give_up_ms:
                raise _GiveUp(
                    f"{TOO_SLOW}: two runs took {took[-2]:.0f} and {took[-1]:.0f} ms, over the "
                    f"{settings.give_up_ms:.0f} ms a run may take (stopped early)"
                )
            yield {name: np.asarray(value) for name, value in zip(names, values, strict=True)}

    arrayfiles.write_all(outputs(), Path(job["outputs"]))  # one sample in memory at a time
    latency: dict[str, float] = {}
    if job["latency"] and feeds:
        latency = _time_runs([session], feeds[0], settings)[0]
        latency["method"] = "alone"
    return {
        "load_ms": load_ms,
        "latency_ms": latency,
        "peak_memory_bytes": max(0, _peak_rss() - rss_before),
    }


class _GiveUp(Exception):
    """The candidate is so slow that measuring it further is wasted time."""


def _race_job(job: dict[str, Any]) -> dict[str, Any]:
    settings = EvalSettings(**job["settings"])
    (feed,) = ArrayFiles(job["samples"])
    sessions = [_session(path, settings) for path in job["models"]]
    figures = _time_runs(sessions, feed, settings)
    for entry in figures:
        entry["method"] = "interleaved"
    return {"latency_ms": figures}


def _time_runs(sessions: Sequence[Any], feed: dict[str, np.ndarray], settings: EvalSettings):
    """Round-robin timing: each round runs every session once, in a rotating order.

    Stops after ``max_repeats`` rounds, or once ``latency_seconds`` per session have
    passed and at least ``min_repeats`` rounds ran.
    """
    for _ in range(settings.warmup):
        for session in sessions:
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + settings.latency_seconds * len(sessions)
    rounds = 0
    while rounds < settings.max_repeats and (
        rounds < settings.min_repeats or time.perf_counter() < deadline
    ):
        for k in range(len(sessions)):
            index = (rounds + k) % len(sessions)
            start = time.perf_counter()
            sessions[index].run(None, feed)
            times[index].append((time.perf_counter() - start) * 1000)
        rounds += 1
    return [
        {
            "median": float(np.median(t)),
            "p90": float(np.percentile(t, 90)),
            "runs": len(t),
        }
        for t in times
    ]


def _child_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    try:
        result = _race_job(job) if job["kind"] == "race" else _measure_job(job)
    except _GiveUp as exc:
        result = {"error": str(exc)}
    except Exception as exc:  # onnxruntime raises its own types for bad models
        text = str(exc).strip() or type(exc).__name__
        result = {"error": f"{type(exc).__name__}: {text.splitlines()[0]}"}
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _child_main(sys.argv[1])
