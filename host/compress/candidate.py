"""A candidate of the search: how it was built, what it measured, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimfleet.host.compress.evaluate import Measurement
from slimfleet.host.compress.fidelity import Fidelity

BASELINE = "baseline"
"""The original model's status: the reference every other candidate is judged against."""
ACCEPTED = "accepted"
"""Within the fidelity budget and not slower than the original."""
REJECTED = "rejected"
"""Measured, but misses the budget, is slower, or returns wrong shapes/NaN."""
FAILED = "failed"
"""A pass raised, or the evaluation process crashed or timed out."""
SKIPPED = "skipped"
"""Not evaluated: no pass changed the model, or it equals an earlier candidate."""


@dataclass
class StepRecord:
    """One pass as it ran for a candidate."""

    pass_name: str
    options: dict[str, Any]
    status: str
    """``applied``, ``unchanged`` (the pass changed nothing), ``skipped`` (check() said
    why not) or ``failed``."""
    notes: str = ""
    seconds: float = 0.0
    auto: bool = False
    """True for a step the search inserted (an opset upgrade a later pass needs)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "options": self.options,
            "status": self.status,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "auto": self.auto,
        }


@dataclass
class Candidate:
    """One model the search built and measured (id 0 is the original)."""

    id: int
    recipe: str
    label: str
    """Short name: the recipe's, or its steps for a ``--passes`` recipe; variants add
    "+ fallback: N nodes in float"."""
    pipeline: str
    """The steps with their options, e.g. ``normalize > simplify > fp16``."""
    description: str = ""
    lossless: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    parent: int | None = None
    """For a per-layer fallback variant: the candidate it falls back from."""
    excluded_nodes: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    measurement: Measurement | None = None
    fidelity: Fidelity | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    undecided: list[dict[str, Any]] = field(default_factory=list)
    """Outputs whose 95% interval holds the fidelity budget: ``{"output", "interval",
    "samples", "samples_to_settle"}``; more samples would settle the verdict."""
    status: str = "pending"
    reason: str = ""
    path: Path | None = None
    """The model file in the search's temp dir (not part of the report)."""

    @property
    def latency_ms(self) -> float | None:
        if self.measurement is None:
            return None
        return self.measurement.latency_ms.get("median")

    def to_dict(self) -> dict[str, Any]:
        figures = self.measurement.figures() if self.measurement else {}
        fidelity = None
        if self.fidelity is not None:
            fidelity = {
                "score": self.fidelity.score,
                "problem": self.fidelity.problem,
                "outputs": {o.name: _public(o.__dict__) for o in self.fidelity.outputs},
            }
        return {
            "id": self.id,
            "recipe": self.recipe,
            "label": self.label,
            "pipeline": self.pipeline,
            "description": self.description,
            "lossless": self.lossless,
            "parent": self.parent,
            "excluded_nodes": self.excluded_nodes,
            "steps": [s.to_dict() for s in self.steps],
            "size_bytes": self.size_bytes,
            "load_ms": figures.get("load_ms"),
            "latency_ms": figures.get("latency_ms") or None,
            "peak_memory_bytes": figures.get("peak_memory_bytes"),
            "fidelity": fidelity,
            "metrics": self.metrics,
            "undecided": self.undecided,
            "status": self.status,
            "reason": self.reason,
        }


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in doc.items() if k != "name"}
