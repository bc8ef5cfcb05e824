"""Measuring a candidate in its own process: the parent side.

:func:`measure` runs ``python -m slimfleet.host.compress.worker JOB`` for one model: the
child (:mod:`~slimfleet.host.compress.worker`) loads the session, runs every evaluation
sample, times repeated runs and reports its peak memory. A crash, a signal or a timeout
comes back as ``Measurement.error``, never as an exception, so one bad candidate is a
row in the report and the search goes on. :func:`race` times finalists round-robin in
one child. Judging the outputs is :mod:`~slimfleet.host.compress.fidelity`'s job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.host.compress import arrayfiles, isolation
from slimfleet.host.compress.arrayfiles import ArrayFiles
from slimfleet.host.compress.isolation import Limits

WORKER_MODULE = "slimfleet.host.compress.worker"
TOO_SLOW = "slower than the original"
Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class EvalSettings:
    """How candidates are measured.

    Latency: ``warmup`` untimed runs, then timed runs until ``max_repeats`` or until
    ``latency_seconds`` have passed with at least ``min_repeats`` runs.
    """

    threads: int = 1
    warmup: int = 3
    min_repeats: int = 10
    max_repeats: int = 200
    latency_seconds: float = 1.5
    timeout: float = 300.0
    """Seconds a candidate's process may take before it is killed and recorded as failed."""
    memory: int | None = None
    """Bytes of RSS the evaluation process may use before it is killed (None: no limit)."""
    give_up_ms: float | None = None
    """Two runs in a row (after the first) slower than this end the measurement with an error
    starting with :data:`TOO_SLOW`: the search sets it to a multiple of the original's
    latency, since a candidate that much slower cannot be chosen."""

    @classmethod
    def quick(cls, threads: int = 1) -> EvalSettings:
        """Few latency repeats: fast and noisy, for tests and trial runs."""
        return cls(threads=threads, warmup=1, min_repeats=3, max_repeats=3, latency_seconds=0.0)


@dataclass
class Measurement:
    """What the child process measured, or why it failed (``error``)."""

    load_ms: float | None = None
    latency_ms: dict[str, Any] = field(default_factory=dict)
    """``{"median", "p90", "runs", "method"}``; method ``alone`` (in its own process) or
    ``interleaved`` (raced round-robin against the original, see :func:`race`)."""
    peak_memory_bytes: int | None = None
    outputs: Sequence[Outputs] = field(default_factory=list)
    """Outputs per evaluation sample, by output name (read from disk one sample at a time)."""
    error: str | None = None

    def figures(self) -> dict[str, Any]:
        """The JSON-safe part for the report."""
        doc = asdict(self)
        del doc["outputs"]
        return doc


def write_samples(feeds: Iterable[dict[str, np.ndarray]], directory: Path) -> list[Path]:
    """Save each sample as its own ``.npz`` for the child processes."""
    return arrayfiles.write_all(feeds, directory)


def _run_child(job: dict[str, Any], workdir: Path, settings: EvalSettings) -> dict[str, Any]:
    """Run one job in a fresh process under the settings' limits; its result, or
    ``{"error": reason}`` (see :mod:`~slimfleet.host.compress.isolation`)."""
    limits = Limits(timeout=settings.timeout, memory=settings.memory)
    outcome = isolation.run_module(WORKER_MODULE, job, limits=limits, workdir=workdir)
    return {"error": outcome.failure} if outcome.failure is not None else outcome.value


def measure(
    model: Path,
    samples: Sequence[Path],
    settings: EvalSettings,
    workdir: Path,
    *,
    latency: bool = True,
) -> Measurement:
    """Run ``model`` on ``samples`` in a fresh process; time it unless ``latency`` is False."""
    job = {
        "kind": "measure",
        "model": str(model),
        "samples": [str(p) for p in samples],
        "settings": asdict(settings),
        "latency": latency,
        "outputs": str(workdir / "outputs"),
    }
    result = _run_child(job, workdir, settings)
    if result.get("error"):
        return Measurement(error=result["error"])
    return Measurement(
        load_ms=result["load_ms"],
        latency_ms=result["latency_ms"],
        peak_memory_bytes=result["peak_memory_bytes"],
        outputs=ArrayFiles(arrayfiles.paths_in(Path(job["outputs"]), len(samples))),
    )


def race(
    models: Sequence[Path], sample: Path, settings: EvalSettings, workdir: Path
) -> list[dict[str, float]] | str:
    """Time ``models`` round-robin in one process: one run of each per round.

    Every model then meets the same background load (other processes, thermal state),
    so their latencies compare fairly even on a busy machine. Only models that already
    ran cleanly in their own process should race. Returns latency figures per model,
    in order, or the reason the race failed.
    """
    job = {
        "kind": "race",
        "models": [str(m) for m in models],
        "samples": [str(sample)],
        "settings": asdict(settings),
    }
    result = _run_child(job, workdir, settings)
    return result.get("error") or result["latency_ms"]
