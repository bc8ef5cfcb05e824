"""Task metrics: plugin-supplied scores computed alongside the built-in fidelity checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Metric:
    """A score in [0, 1] comparing a candidate's outputs with the original's, sample by sample.

    ``compute(reference, candidate)`` gets one dict of outputs per evaluation sample.
    A candidate whose score is below the fidelity budget is rejected, like any
    built-in fidelity figure.
    """

    name: str
    description: str
    compute: Callable[[Sequence[Outputs], Sequence[Outputs]], float]
