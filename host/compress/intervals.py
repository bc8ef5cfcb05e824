"""95% intervals of a score over its units (rows, sequences or samples).

A Wilson score interval for proportions, a percentile bootstrap of the mean
(:data:`BOOTSTRAP_RESAMPLES` resamples, seeded, so repeatable) for continuous scores.
Pure functions; the cost of :func:`bootstrap` is ``BOOTSTRAP_RESAMPLES`` means of
``len(scores)`` values.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
"""The standard normal quantile for a two-sided 95% interval."""
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n``."""
    if n <= 0:
        return (0.0, 1.0)
    if successes >= n:  # closed form at the edge, free of rounding: (n / (n + z^2), 1)
        return (n / (n + z * z), 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(scores: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``scores`` (seeded, repeatable)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = np.empty(BOOTSTRAP_RESAMPLES)
    for i in range(BOOTSTRAP_RESAMPLES):
        means[i] = scores[rng.integers(0, len(scores), len(scores))].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))
