"""What a search may spend, and how it plans within it: wall time and tree memory.

``--time-budget`` (default 5 minutes) and ``--max-memory`` (default 4 GiB) become one
:class:`Budget`. The search measures the original first; a candidate is then expected
to cost about :data:`CANDIDATE_FACTOR` times that (until real candidates have been
timed, then their median). Work is started only while it is expected to fit, in the
order of priority: the recipes in registry order, then the fallback variants, then the
interleaved latency race. What does not fit is skipped with the reason, and each
candidate's child processes share one deadline, so a search overruns its budget by at
most one candidate's timeout.

Memory: the budget is for the whole process tree. A child may use what the parent does
not (:meth:`Budget.child_limits`); the fallback analysis and calibration size their
batches from that figure (:func:`batch_bytes`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import psutil

from slimfleet.host.compress.isolation import Limits
from slimfleet.host.compress.resources import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_TIME_BUDGET,
    format_bytes,
)

CANDIDATE_FACTOR = 3.0
"""A candidate (passes, then evaluation) is first guessed at 3x the original's measurement."""
MIN_CHILD_MEMORY = 64 << 20
"""A child is never given less than 64 MiB, even when the parent holds nearly everything."""
MIN_CANDIDATE_SECONDS = 10.0
"""A candidate started near the end of the budget still gets this long."""
BATCH_SHARE = 0.25
"""Share of a child's memory that one batch of kept arrays (intermediate outputs) may take."""


def batch_bytes(memory: int | None) -> int:
    """Bytes of arrays one batch may hold in a child allowed ``memory`` (None: 1 GiB)."""
    return int((memory if memory is not None else 4 << 30) * BATCH_SHARE)


@dataclass
class Budget:
    """Seconds of wall time and bytes of tree RSS for one search, from ``started``.

    Not thread-safe (no lock): the search drives it from one thread.
    """

    seconds: float = DEFAULT_TIME_BUDGET
    memory: int = DEFAULT_MAX_MEMORY
    candidate_timeout: float = 300.0
    """The longest a candidate may take, however much budget is left."""
    started: float = field(default_factory=time.monotonic)
    costs: list[float] = field(default_factory=list)
    """Wall seconds of each finished candidate."""
    first_guess: float | None = None
    deadline: float | None = None
    """The current candidate's deadline (see :meth:`start_candidate`)."""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def learn_original(self, seconds: float) -> None:
        """The original took ``seconds`` to measure: guess candidates from it."""
        self.first_guess = max(0.1, seconds) * CANDIDATE_FACTOR

    def candidate_cost(self) -> float:
        """Expected seconds of the next candidate."""
        if self.costs:
            return statistics.median(self.costs)
        return self.first_guess or 0.0

    def why_not(self, cost: float | None = None) -> str | None:
        """None when work expected to take ``cost`` seconds (default: one candidate)
        fits in what is left, else the reason to skip it."""
        cost = self.candidate_cost() if cost is None else cost
        left = self.remaining()
        if cost <= left:
            return None
        return (
            f"time budget: {max(0.0, left):.0f} s of {self.seconds:g} s left, "
            f"this takes about {cost:.0f} s here (--time-budget)"
        )

    def start_candidate(self) -> None:
        """Start the clock of one candidate: its children share this deadline."""
        allowed = min(self.candidate_timeout, max(self.remaining(), MIN_CANDIDATE_SECONDS))
        self.deadline = time.monotonic() + allowed

    def finish_candidate(self, seconds: float) -> None:
        self.costs.append(seconds)
        self.deadline = None

    def child_limits(self) -> Limits:
        """The limits of the next child process: the candidate's deadline (or a whole
        candidate timeout) and the memory the parent leaves free."""
        if self.deadline is None:
            timeout = self.candidate_timeout
        else:
            timeout = max(0.5, self.deadline - time.monotonic())
        parent = psutil.Process().memory_info().rss
        return Limits(timeout=timeout, memory=max(MIN_CHILD_MEMORY, self.memory - parent))

    def describe(self) -> dict[str, object]:
        """The JSON-safe figures for the report."""
        return {
            "time_budget_seconds": self.seconds,
            "max_memory_bytes": self.memory,
            "max_memory": format_bytes(self.memory),
            "candidate_timeout_seconds": self.candidate_timeout,
            "estimated_candidate_seconds": round(self.candidate_cost(), 2),
        }
