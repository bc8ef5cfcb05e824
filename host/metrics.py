"""Task metrics: plugin-supplied scores computed alongside the built-in per-output metrics.

The built-in metrics (:mod:`slimfleet.host.compress.fidelity`) judge each output on its
own. A plugin metric sees every output of every sample, for a task score that spans
outputs. For example (the test suite runs this very code), text match for an OCR model
whose output ``logits`` is ``[steps, batch, classes]`` with class 0 as the CTC blank::

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
