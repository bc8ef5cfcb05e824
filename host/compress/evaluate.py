"""Measuring a candidate in its own process, and judging its outputs against the original's.

:func:`measure` runs ``python -m slimfleet.host.compress.evaluate JOB`` for one model: the
child loads the session, runs every evaluation sample, times repeated runs and reports
its peak memory. A crash, a signal or a timeout comes back as
``Measurement.error``, never as an exception, so one bad candidate is a row in the
report and the search goes on. The child imports only numpy, onnxruntime and psutil,
so it starts in a fraction of a second.

:func:`compare` then scores the candidate's outputs against the original's on the same
held-out samples, and :func:`score_metrics` adds the plugins' task metrics.

A task metric plugin, for example CTC text match for an OCR model whose output
``logits`` is ``[steps, batch, classes]`` with class 0 as the CTC blank (the test suite
runs this very code)::

    import numpy as np

    from slimfleet.host.hookspecs import hookimpl
    from slimfleet.host.metrics import Metric


    def ctc_decode(logits):
        best = logits.argmax(-1)[:, 0]  # greedy path over the time steps
        keep = np.r_[True, best[1:] != best[:-1]]  # collapse repeats...
        return [int(c) for c in best[keep] if c]  # ...then drop blanks


    def ctc_text_match(reference, candidate):
        same = [ctc_decode(r["logits"]) == ctc_decode(c["logits"])
                for r, c in zip(reference, candidate)]
        return sum(same) / len(same)


    @hookimpl
    def slimfleet_add_metrics(metrics):
        metrics.add(Metric("ctc_text", "decoded text equals the original's", ctc_text_match))

Every candidate then gets ``metrics["ctc_text"]`` in the report, and one scoring below
the ``--fidelity`` budget is rejected.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress import arrayfiles, isolation
from slimfleet.host.compress.arrayfiles import ArrayFiles
from slimfleet.host.compress.isolation import Limits

if TYPE_CHECKING:
    from slimfleet.host.metrics import Metric

WORKER_MODULE = "slimfleet.host.compress.evaluate"
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


# -- judging outputs -----------------------------------------------------------------


@dataclass
class OutputFidelity:
    """How one output of a candidate compares with the original's, over all samples."""

    name: str
    judged_by: str
    """``argmax`` (class-like float output), ``cosine`` (other floats) or ``exact``."""
    score: float
    argmax_agreement: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None


@dataclass
class Fidelity:
    """Per-output fidelity, or the ``problem`` (wrong shape, NaN/Inf) that rejects outright."""

    outputs: list[OutputFidelity] = field(default_factory=list)
    problem: str | None = None

    @property
    def score(self) -> float:
        """The worst output's score (0 when there is a problem)."""
        if self.problem is not None or not self.outputs:
            return 0.0
        return min(o.score for o in self.outputs)


def class_like(array: np.ndarray) -> bool:
    """True when the last axis looks like class scores, so argmax agreement is meaningful.

    A float output of rank 1 to 3 whose last axis has at least 2 entries and is its
    longest (``[1, 1000]``, ``[steps, 1, classes]``), unlike images or box lists.
    """
    if array.dtype.kind != "f" or not 1 <= array.ndim <= 3 or array.shape[-1] < 2:
        return False
    return array.shape[-1] >= max(array.shape)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def _compare_output(
    name: str, reference: list[np.ndarray], candidate: list[np.ndarray]
) -> OutputFidelity | str:
    """Score one output, or return the problem that rejects the candidate."""
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        if ref.shape != got.shape:
            return (
                f"output {name!r} has shape {list(got.shape)} where the original has "
                f"{list(ref.shape)} (sample {i})"
            )
        if got.dtype.kind == "f" and not np.isfinite(got[np.isfinite(ref)]).all():
            return f"output {name!r} contains NaN or Inf (sample {i})"
    if reference[0].dtype.kind != "f":
        same = [np.sum(r == c) for r, c in zip(reference, candidate, strict=True)]
        agreement = float(sum(same) / max(1, sum(r.size for r in reference)))
        return OutputFidelity(name, "exact", agreement, argmax_agreement=agreement)
    finite = [np.isfinite(r) for r in reference]
    cosine = float(
        np.mean([_cosine(r[f], c[f]) for r, c, f in zip(reference, candidate, finite, strict=True)])
    )
    max_err = max(
        (float(np.max(np.abs(r[f] - c[f]), initial=0.0)))
        for r, c, f in zip(reference, candidate, finite, strict=True)
    )
    argmax = None
    if class_like(reference[0]):
        hits = sum(
            int(np.sum(r.argmax(-1) == c.argmax(-1)))
            for r, c in zip(reference, candidate, strict=True)
        )
        argmax = hits / max(1, sum(r.size // r.shape[-1] for r in reference))
    return OutputFidelity(
        name,
        "argmax" if argmax is not None else "cosine",
        argmax if argmax is not None else cosine,
        argmax_agreement=argmax,
        cosine=cosine,
        max_abs_error=max_err,
    )


def compare(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> Fidelity:
    """Score ``candidate`` against ``reference`` output by output, sample by sample."""
    if len(reference) != len(candidate):
        return Fidelity(problem=f"{len(candidate)} results for {len(reference)} samples")
    if not reference:
        return Fidelity(problem="no evaluation samples")
    fidelity = Fidelity()
    for name in reference[0]:
        if any(name not in c for c in candidate):
            return Fidelity(problem=f"output {name!r} is missing")
        scored = _compare_output(name, [r[name] for r in reference], [c[name] for c in candidate])
        if isinstance(scored, str):
            return Fidelity(outputs=fidelity.outputs, problem=scored)
        fidelity.outputs.append(scored)
    return fidelity


def score_metrics(
    metrics: Iterable[Metric], reference: Sequence[Outputs], candidate: Sequence[Outputs]
) -> dict[str, float]:
    """Each task metric's score for ``candidate``; NaN counts as 0.

    A metric that raises becomes a :class:`SlimfleetError` naming it (the candidate fails).
    """
    scores = {}
    for metric in metrics:
        try:
            value = float(metric.compute(reference, candidate))
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise SlimfleetError(
                f"task metric {metric.name!r} raised {type(exc).__name__}: {text}"
            ) from None
        scores[metric.name] = value if math.isfinite(value) else 0.0
    return scores


# -- the child process ------------------------------------------------------------------


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


def _measure_job(job: dict[str, Any]) -> dict[str, Any]:
    settings = EvalSettings(**job["settings"])
    feeds = ArrayFiles(job["samples"])
    rss_before = _current_rss()
    start = time.perf_counter()
    session = _session(job["model"], settings)
    load_ms = (time.perf_counter() - start) * 1000
    names = [o.name for o in session.get_outputs()]

    def outputs() -> Iterator[dict[str, np.ndarray]]:
        took: list[float] = []
        for feed in feeds:
            started = time.perf_counter()
            values = session.run(None, feed)
            took.append((time.perf_counter() - started) * 1000)
            # The first run warms up; two slow runs in a row are not a passing hiccup.
            fastest = min(took[1:][-2:]) if len(took) >= 3 else 0.0
            if settings.give_up_ms is not None and fastest > settings.give_up_ms:
                raise _GiveUp(
                    f"{TOO_SLOW}: two runs took {took[-2]:.0f} and {took[-1]:.0f} ms, over the "
                    f"{settings.give_up_ms:.0f} ms a run may take (stopped early)"
                )
            yield dict(zip(names, values, strict=True))

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
