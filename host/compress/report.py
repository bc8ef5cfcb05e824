"""The report of a ``compress`` run: ``report.json`` for scripts, ``report.html`` for people.

``report.json`` holds every candidate with its steps, figures and verdict, the choice
with its reason, and a ``summary`` that ``slimfleet publish`` copies into the model
manifest. ``report.html`` shows the same as a table and an inline SVG chart of latency
against size; it needs no network and no scripts. Plugins add sections through
``slimfleet_report_section``.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import outdir, reporthtml
from slimfleet.host.compress.candidate import Candidate
from slimfleet.host.compress.choice import ratio_text
from slimfleet.host.compress.modelfile import io_signature, opset
from slimfleet.host.passes import Feed
from slimfleet.host.sections import ReportSection

if TYPE_CHECKING:
    from slimfleet.host.compress.choice import Choice
    from slimfleet.host.compress.data import Samples


@dataclass
class Report:
    """What :func:`slimfleet.host.compress.search.compress` returns: the report.json
    document and the directory holding ``model.onnx`` and the reports."""

    data: dict[str, Any]
    outdir: Path

    @property
    def summary(self) -> dict[str, Any]:
        return self.data["summary"]

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return self.data["candidates"]

    @property
    def model_path(self) -> Path:
        return self.outdir / outdir.MODEL


def _slimfleet_version() -> str:
    try:
        return version("slimfleet")
    except PackageNotFoundError:
        return "unknown"


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 4) if value is not None and base else None


def build(
    *,
    model_path: Path,
    model: onnx.ModelProto,
    candidates: list[Candidate],
    choice: Choice,
    settings: dict[str, Any],
    samples: Samples,
    elapsed: float,
) -> dict[str, Any]:
    """The report.json document (without plugin sections)."""
    baseline, chosen = candidates[0], choice.candidate
    summary = {
        "chosen": chosen.label,
        "candidate": chosen.id,
        "recipe": chosen.recipe,
        "kept_original": choice.kept_original,
        "objective": settings["objective"],
        "fidelity_budget": settings["fidelity"],
        "fidelity": chosen.fidelity.score if chosen.fidelity else None,
        "metrics": chosen.metrics,
        "size_bytes": chosen.size_bytes,
        "latency_ms": chosen.latency_ms,
        "size_ratio": _ratio(chosen.size_bytes, baseline.size_bytes),
        "latency_ratio": _ratio(chosen.latency_ms, baseline.latency_ms),
        "ratios": ratio_text(
            chosen.latency_ms, baseline.latency_ms, chosen.size_bytes, baseline.size_bytes
        ),
        "original": {"size_bytes": baseline.size_bytes, "latency_ms": baseline.latency_ms},
        "threads": settings["threads"],
        "data": samples.source,
        "passes": [s.pass_name for s in chosen.steps if s.status == "applied"],
    }
    return {
        "slimfleet_version": _slimfleet_version(),
        "model": {
            "path": str(model_path),
            "size_bytes": baseline.size_bytes,
            "opset": opset(model),
            **io_signature(model),
        },
        "settings": settings,
        "samples": {
            "source": samples.source,
            "calibration": len(samples.calibration),
            "evaluation": len(samples.evaluation),
        },
        "warnings": list(samples.warnings),
        "candidates": [c.to_dict() for c in candidates],
        "choice": {
            "candidate": chosen.id,
            "label": chosen.label,
            "reason": choice.reason,
            "kept_original": choice.kept_original,
        },
        "summary": summary,
        "elapsed_seconds": round(elapsed, 2),
        "sections": [],
    }


def sections(hook: Any, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Sections from every ``slimfleet_report_section`` implementation, as dicts."""
    found = []
    for section in hook.slimfleet_report_section(report=doc):
        if section is None:
            continue
        if not isinstance(section, ReportSection):
            raise TypeError(f"slimfleet_report_section returned {type(section).__name__}")
        found.append(asdict(section))
    return found


def _npz_bytes(feed: Feed) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **feed)
    return buffer.getvalue()


def write(
    out: Path, doc: dict[str, Any], model: Path, sample: Feed, *, stale: tuple[str, ...] = ()
) -> None:
    """Write model.onnx (from the file ``model``), report.json, report.html and sample.npz
    into ``out``, all or none (:func:`~.outdir.staged`), removing an earlier output's
    ``stale`` files: a failed write leaves ``out`` as it was and is an InputError naming
    the file."""
    files = {
        outdir.SAMPLE: _npz_bytes(sample),
        outdir.REPORT_JSON: (json.dumps(doc, indent=2, default=_json_default) + "\n").encode(),
        outdir.REPORT_HTML: reporthtml.to_html(doc).encode(),
    }
    name = outdir.MODEL
    try:
        with outdir.staged(out, stale=stale) as stage:
            outdir.write_model(stage, model)
            for name, data in files.items():
                outdir.write_atomic(stage / name, data)
    except OSError as exc:
        failed = Path(exc.filename) if exc.filename else None
        where = failed if failed is not None and failed.parent == out else out / name
        raise InputError(f"{where}: cannot write ({exc.strerror or exc})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
