"""Measuring a candidate in its own process: the parent side.

:func:`measure` runs ``python -m slimfleet.host.compress.worker JOB`` for one model: the
child (:mod:`~slimfleet.host.compress.worker`) loads the session, runs every evaluation
sample, times repeated runs and reports its peak memory. A crash, a signal or a timeout
comes back as ``Measurement.error``, never as an exception, so one bad candidate is a
row in the report and the search goes on. :func:`race` times finalists round-robin in
one child. Judging the outputs is :mod:`~slimfleet.host.compress.fidelity`'s job.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WORKER_MODULE = "slimfleet.host.compress.worker"
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
    outputs: list[Outputs] = field(default_factory=list)
    """Outputs per evaluation sample, by output name."""
    error: str | None = None

    def figures(self) -> dict[str, Any]:
        """The JSON-safe part for the report."""
        doc = asdict(self)
        del doc["outputs"]
        return doc


def write_samples(feeds: Sequence[dict[str, np.ndarray]], directory: Path) -> list[Path]:
    """Save each sample as its own ``.npz`` for the child processes."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, feed in enumerate(feeds):
        path = directory / f"sample-{i:04d}.npz"
        np.savez(path, **feed)
        paths.append(path)
    return paths


def _run_child(job: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one job in a fresh process; its result, or ``{"error": reason}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = {**job, "result": str(workdir / "result.json")}
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", WORKER_MODULE, str(job_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    result_path = Path(job["result"])
    if proc.returncode != 0 or not result_path.exists():
        return {"error": _exit_reason(proc.returncode, proc.stderr)}
    return json.loads(result_path.read_text())


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
        "outputs": str(workdir / "outputs.npz"),
    }
    result = _run_child(job, workdir, settings.timeout)
    if result.get("error"):
        return Measurement(error=result["error"])
    return Measurement(
        load_ms=result["load_ms"],
        latency_ms=result["latency_ms"],
        peak_memory_bytes=result["peak_memory_bytes"],
        outputs=_load_outputs(Path(job["outputs"]), result["output_names"], len(samples)),
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
    result = _run_child(job, workdir, settings.timeout)
    return result.get("error") or result["latency_ms"]


def _exit_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the evaluation process crashed ({name})"
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "no message"
    return f"the evaluation process exited with code {returncode}: {last}"


def _load_outputs(path: Path, names: list[str], count: int) -> list[Outputs]:
    with np.load(path, allow_pickle=False) as npz:
        return [{name: npz[f"{i}_{j}"] for j, name in enumerate(names)} for i in range(count)]
