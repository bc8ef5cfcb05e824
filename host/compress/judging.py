"""Judging candidates: fidelity and task metrics against the budget, the latency race.

A mixin of :class:`~slimfleet.host.compress.search.Search` (it uses the search's
``candidates``, ``reference``, ``specs``, ``budget``, ``plan``, ``settings`` and progress);
a judged candidate is ``ACCEPTED`` or ``REJECTED``/``FAILED`` with a one-line reason, and
near misses are remembered in ``_missed_budget`` for the variants (see
:mod:`~slimfleet.host.compress.variants`). The latency verdict is given after the finalists
(at most :data:`RACE_SIZE`) were re-timed round-robin with the original.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import numpy as np

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress.candidate import ACCEPTED, FAILED, REJECTED, Candidate
from slimfleet.host.compress.choice import ratio_text
from slimfleet.host.compress.evaluate import TOO_SLOW, race
from slimfleet.host.compress.fidelity import compare, samples_to_settle, score_metrics, straddles

log = logging.getLogger(__name__)

SLOWER_TOLERANCE = 0.05
"""A candidate up to 5% slower than the original still counts as "not slower" (timing noise)."""
RACE_SIZE = 8
"""Accepted candidates (best on the objective first) re-timed round-robin with the original."""


class Judging:
    """The verdicts of :class:`~slimfleet.host.compress.search.Search` (mixed into it)."""

    def _judge(self, candidate: Candidate) -> None:
        measurement = candidate.measurement
        assert measurement is not None
        if measurement.error:
            too_slow = measurement.error.startswith(TOO_SLOW)
            candidate.status, candidate.reason = REJECTED if too_slow else FAILED, measurement.error
            return
        outputs, measurement.outputs = measurement.outputs, []
        candidate.fidelity = compare(self.reference, outputs, self.specs)
        candidate.undecided = self._undecided(candidate)
        try:
            candidate.metrics = score_metrics(self.plugins.metrics, self.reference, outputs)
        except SlimfleetError as exc:
            candidate.status, candidate.reason = FAILED, str(exc)
            return
        finally:
            shutil.rmtree(self.workdir / f"cand-{candidate.id}" / "outputs", ignore_errors=True)
        fidelity = candidate.fidelity
        low_metrics = {k: v for k, v in candidate.metrics.items() if v < self.budget}
        if fidelity.problem:
            candidate.status, candidate.reason = REJECTED, fidelity.problem
        elif fidelity.score < self.budget:
            worst = fidelity.worst()
            assert worst is not None
            candidate.status = REJECTED
            candidate.reason = (
                f"fidelity {fidelity.score:.6g} is below the budget {self.budget} "
                f"(output {worst.name!r}, {worst.metric}, {worst.samples} samples)"
            )
        elif low_metrics:
            name, value = next(iter(low_metrics.items()))
            candidate.status = REJECTED
            candidate.reason = f"task metric {name} {value:.6g} is below the budget {self.budget}"
        else:  # the latency verdict comes after the race
            candidate.status = ACCEPTED
            return
        self._missed_budget.add(candidate.id)

    def _undecided(self, candidate: Candidate) -> list[dict[str, Any]]:
        """Outputs whose 95% interval holds the budget: the samples cannot tell."""
        assert candidate.fidelity is not None
        return [
            {
                "output": o.name,
                "interval": list(o.interval or ()),
                "samples": o.samples,
                "samples_to_settle": samples_to_settle(o, self.budget),
            }
            for o in candidate.fidelity.outputs
            if straddles(o, self.budget)
        ]

    def _race(self) -> None:
        """Re-time the best accepted candidates round-robin with the original."""
        baseline = self.candidates[0]
        self._alone = dict(baseline.measurement.latency_ms) if baseline.measurement else {}
        accepted = [c for c in self.candidates if c.status == ACCEPTED]
        runners = sorted(accepted, key=self._objective_key)[:RACE_SIZE]
        if not runners:
            self._total -= 1
            return
        self._step(f"timing {len(runners)} finalist(s) against the original, interleaved")
        racers = [baseline, *runners]
        load = sum((c.measurement.load_ms or 0) / 1000 for c in racers if c.measurement)
        over = self.plan.why_not(load + len(racers) * self.settings.latency_seconds)
        if over:
            self.skipped.append(f"skipped the interleaved latency race: {over}")
            return
        self.plan.start_candidate()
        figures = race(
            [c.path for c in racers if c.path],
            self.sample_paths[0],
            self._eval_settings(),
            self.workdir / "race",
        )
        self.plan.deadline = None
        if isinstance(figures, str):
            log.warning("latency race failed (%s); using each model's own timing", figures)
            return
        for candidate, latency in zip(racers, figures, strict=True):
            assert candidate.measurement is not None
            candidate.measurement.latency_ms = latency

    def _objective_key(self, candidate: Candidate) -> tuple[float, float]:
        latency, size = candidate.latency_ms or np.inf, candidate.size_bytes or np.inf
        return (latency, size) if self.objective == "latency" else (size, latency)

    def _judge_latency(self, candidate: Candidate) -> None:
        """Reject a candidate slower than the original, timed the same way (raced or alone)."""
        assert candidate.measurement is not None and candidate.fidelity is not None
        baseline = self.candidates[0]
        base = baseline.latency_ms
        if candidate.measurement.latency_ms.get("method") != baseline.measurement.latency_ms.get(
            "method"
        ):
            base = self._alone.get("median")
        mine = candidate.latency_ms or np.inf
        if mine > (base or 0) * (1 + SLOWER_TOLERANCE):
            candidate.status = REJECTED
            candidate.reason = f"slower than the original: {_ms(mine)} vs {_ms(base)}"
            return
        candidate.reason = (
            f"fidelity {candidate.fidelity.score:.6g} within budget; "
            f"{ratio_text(mine, base, candidate.size_bytes, baseline.size_bytes)}"
        )


def _ms(value: float | None) -> str:
    """Milliseconds to 3 significant digits (0.0142 ms, 12.3 ms, 1234 ms): two
    sub-millisecond timings that differ by 6% must not read alike."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3g} ms" if abs(value) < 100 else f"{value:.0f} ms"
