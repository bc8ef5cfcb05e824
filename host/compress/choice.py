"""Choosing the model to ship from the judged candidates: pure functions, no I/O.

The rule: among accepted candidates that are better than the original on the objective
and neither larger nor slower than it, the best on the objective; what timing or size
noise cannot tell apart goes to the other figure, then to the more faithful candidate
(so a plainer variant never wins on a few bytes or a noisy millisecond). When none is, a
lossless candidate (the original, simplified) that is smaller or faster and no worse on
the other figure; else the original itself, byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slimfleet.host.compress.candidate import ACCEPTED, Candidate

TIE = 0.03
"""Latencies within 3% are a tie (timing noise), broken by size."""
SIZE_TIE = 0.01
"""Sizes within 1% are a tie, broken by latency."""


def ratio_text(
    latency: float | None,
    base_latency: float | None,
    size: float | None,
    base_size: float | None,
) -> str:
    """The one way slimfleet writes ratios: ``2.37x faster, 3.86x smaller``.

    Each figure is the larger over the smaller, with the direction in words
    (``1.20x slower``, ``same size``); ``n/a`` when a figure is missing.
    """
    return f"{_one_ratio(latency, base_latency, 'faster', 'slower', 'same speed')}, " + (
        _one_ratio(size, base_size, "smaller", "larger", "same size")
    )


def _one_ratio(value: float | None, base: float | None, better: str, worse: str, same: str) -> str:
    if not value or not base or not np.isfinite(value) or not np.isfinite(base):
        return f"{better}: n/a"
    if value < base:
        factor = base / value
        return f"{factor:.2f}x {better}" if f"{factor:.2f}" != "1.00" else same
    factor = value / base
    return f"{factor:.2f}x {worse}" if f"{factor:.2f}" != "1.00" else same


def _figures(candidate: Candidate) -> tuple[float, float]:
    return candidate.latency_ms or np.inf, candidate.size_bytes or np.inf


def not_worse(candidate: Candidate, baseline: Candidate) -> bool:
    """Neither slower nor larger than the original, up to the tie margins."""
    lat, size = _figures(candidate)
    base_lat, base_size = _figures(baseline)
    return lat <= base_lat * (1 + TIE) and size <= base_size * (1 + SIZE_TIE)


def beats(candidate: Candidate, baseline: Candidate) -> bool:
    """Not worse than the original on either figure, and better on at least one: on the
    objective, or tied on it and better on the other."""
    if not not_worse(candidate, baseline):
        return False
    lat, size = _figures(candidate)
    base_lat, base_size = _figures(baseline)
    faster, smaller = lat < base_lat * (1 - TIE), size < base_size * (1 - SIZE_TIE)
    return faster or smaller


def best(candidates: Sequence[Candidate], objective: str) -> Candidate:
    """Best on the objective; near-ties on it go to the better other figure, and
    candidates tied on both (within the noise margins) to the higher fidelity score."""
    first = 0 if objective == "latency" else 1  # the objective's index in _figures
    second = 1 - first
    margins = (TIE, SIZE_TIE)
    tied = list(candidates)
    for index in (first, second):
        lowest = min(_figures(c)[index] for c in tied)
        tied = [c for c in tied if _figures(c)[index] <= lowest * (1 + margins[index])]
    return min(tied, key=lambda c: (-_score(c), _figures(c)[second], _figures(c)[first], c.id))


def _score(candidate: Candidate) -> float:
    return candidate.fidelity.score if candidate.fidelity is not None else 0.0


@dataclass(frozen=True)
class Choice:
    """The candidate to ship, why, and whether that means keeping the original."""

    candidate: Candidate
    reason: str
    kept_original: bool


def choose(candidates: Sequence[Candidate], objective: str) -> Choice:
    """Pick from ``candidates``, whose first entry is the original (the baseline).

    A lossless winner (the original, simplified) counts as keeping the original. A
    candidate that ties the original on both figures, or is better on one but worse on
    the other (a "lossless" simplification that stored int8 weights as float), never
    wins: then the original is kept byte for byte.
    """
    baseline = candidates[0]
    accepted = [c for c in candidates if c.status == ACCEPTED]
    winners = [c for c in accepted if beats(c, baseline)]
    if winners:
        chosen = best(winners, objective)
        figure = "fastest" if objective == "latency" else "smallest"
        ratios = ratio_text(
            chosen.latency_ms, baseline.latency_ms, chosen.size_bytes, baseline.size_bytes
        )
        kind = "losslessly simplified " if chosen.lossless else ""
        return Choice(
            chosen,
            f"{figure} of {len(winners)} candidate{'s' * (len(winners) > 1)} that beat the "
            f"original inside the fidelity budget, neither larger (beyond {SIZE_TIE:.0%}) nor "
            f"slower (beyond {TIE:.0%}, timing noise): {kind}{ratios}",
            kept_original=chosen.lossless,
        )
    return Choice(
        baseline,
        f"no candidate beat the original on {objective} inside the fidelity budget without "
        f"being larger or slower ({len(accepted)} accepted, "
        f"{len(candidates) - 1 - len(accepted)} not); keeping the original byte for byte",
        True,
    )
