"""The report of a ``compress`` run: ``report.json`` for scripts, ``report.html`` for people.

``report.json`` holds every candidate with its steps, figures and verdict, the choice
with its reason, and a ``summary`` that ``slimfleet publish`` copies into the model
manifest. ``report.html`` shows the same as a table and an inline SVG chart of latency
against size; it needs no network and no scripts. Plugins add sections through
``slimfleet_report_section``.
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import outdir
from slimfleet.host.compress.candidate import Candidate
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


def write(out: Path, doc: dict[str, Any], model: Path, sample: Feed) -> None:
    """Write model.onnx (from the file ``model``), report.json, report.html and sample.npz
    into ``out``, each atomically."""
    try:
        outdir.write_model(out, model)
    except OSError as exc:
        raise InputError(f"{out / outdir.MODEL}: cannot write ({exc.strerror or exc})") from None
    files = {
        outdir.SAMPLE: _npz_bytes(sample),
        outdir.REPORT_JSON: (json.dumps(doc, indent=2, default=_json_default) + "\n").encode(),
        outdir.REPORT_HTML: to_html(doc).encode(),
    }
    for name, data in files.items():
        try:
            outdir.write_atomic(out / name, data)
        except OSError as exc:
            raise InputError(f"{out / name}: cannot write ({exc.strerror or exc})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- HTML -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:80em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen{background:#e8f6e8;font-weight:600} .warn{background:#fff3cd;border:2px solid #e0a800;
padding:.6em 1em;font-weight:600} .accepted{color:#1a7f37} .rejected{color:#b35900}
.failed{color:#c62828} .skipped{color:#777} .baseline{color:#1f5fbf}
details summary{cursor:pointer} code{font-size:.9em}
"""

_COLOURS = {"baseline": "#1f5fbf", "accepted": "#1a7f37", "rejected": "#e07000"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mb(value: float | None) -> str:
    return f"{value / 1e6:.2f}" if value is not None else "–"


def _num(value: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value is not None else "–"


def to_html(doc: dict[str, Any]) -> str:
    """The whole report as one self-contained HTML page."""
    summary, choice = doc["summary"], doc["choice"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>slimfleet report: {_e(Path(doc['model']['path']).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>slimfleet compress: {_e(doc['model']['path'])}</h1>",
    ]
    parts += [f"<p class=warn>Warning: {_e(w)}</p>" for w in doc["warnings"]]
    parts.append(
        f"<p><b>Chosen: #{choice['candidate']} {_e(choice['label'])}</b><br>{_e(choice['reason'])}"
        f"</p><p>Size {_mb(summary['size_bytes'])} MB ({_num(summary['size_ratio'], 2)}x), "
        f"latency {_num(summary['latency_ms'])} ms ({_num(summary['latency_ratio'], 2)}x), "
        f"fidelity {_num(summary['fidelity'], 4)} (budget {summary['fidelity_budget']}, "
        f"objective {_e(summary['objective'])}, {summary['threads']} thread(s), "
        f"data: {_e(doc['samples']['source'])}, {doc['samples']['evaluation']} evaluation / "
        f"{doc['samples']['calibration']} calibration samples). "
        f"Search took {doc['elapsed_seconds']:.1f} s.</p>"
    )
    parts.append("<h2>Latency against size</h2>")
    parts.append(chart(doc["candidates"], choice["candidate"]))
    parts.append("<h2>Candidates</h2>")
    parts.append(_table(doc["candidates"], choice["candidate"]))
    for section in doc.get("sections", []):
        parts.append(f"<h2>{_e(section['title'])}</h2>")
        if section.get("text"):
            parts.append(f"<p>{_e(section['text'])}</p>")
        if section.get("data"):
            rows = "".join(
                f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v, default=str))}</td></tr>"
                for k, v in section["data"].items()
            )
            parts.append(f"<table>{rows}</table>")
    parts.append(
        f"<p><small>slimfleet {_e(doc['slimfleet_version'])}; figures in report.json."
        "</small></p></body></html>\n"
    )
    return "".join(parts)


def _fidelity_cell(candidate: dict[str, Any]) -> str:
    fidelity = candidate["fidelity"]
    if not fidelity:
        return "–"
    details = "; ".join(
        f"{name}: "
        + ", ".join(
            f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in figures.items()
            if value is not None
        )
        for name, figures in fidelity["outputs"].items()
    )
    return f"<span title='{_e(details)}'>{fidelity['score']:.4f}</span>"


def _steps(candidate: dict[str, Any]) -> str:
    if not candidate["steps"]:
        return _e(candidate["label"])
    items = "".join(
        f"<li><code>{_e(s['pass'])}</code>{' (auto)' * s['auto']}: {_e(s['status'])}"
        f"{' – ' + _e(s['notes']) if s['notes'] else ''}</li>"
        for s in candidate["steps"]
    )
    return (
        f"<details><summary>{_e(candidate['label'])}</summary><code>{_e(candidate['pipeline'])}"
        f"</code><ol>{items}</ol></details>"
    )


def _table(candidates: list[dict[str, Any]], chosen: int) -> str:
    head = (
        "<tr><th>#</th><th>recipe</th><th>status</th><th>size MB</th><th>latency ms<br>"
        "median / p90</th><th>load ms</th><th>memory MB</th><th>fidelity</th>"
        "<th>metrics</th><th>reason</th></tr>"
    )
    rows = []
    for c in candidates:
        latency = c["latency_ms"] or {}
        metrics = ", ".join(f"{_e(k)} {v:.4f}" for k, v in c["metrics"].items()) or "–"
        rows.append(
            f"<tr{' class=chosen' if c['id'] == chosen else ''}><td class=n>{c['id']}</td>"
            f"<td>{_steps(c)}</td><td class={_e(c['status'])}>{_e(c['status'])}</td>"
            f"<td class=n>{_mb(c['size_bytes'])}</td>"
            f"<td class=n>{_num(latency.get('median'))} / {_num(latency.get('p90'))}</td>"
            f"<td class=n>{_num(c['load_ms'], 1)}</td>"
            f"<td class=n>{_mb(c['peak_memory_bytes'])}</td>"
            f"<td class=n>{_fidelity_cell(c)}</td><td>{metrics}</td><td>{_e(c['reason'])}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _ticks(top: float, count: int = 6) -> list[float]:
    step = 10 ** math.floor(math.log10(top / count)) if top > 0 else 1
    for factor in (1, 2, 5, 10):
        if top / (step * factor) <= count:
            step *= factor
            break
    return [i * step for i in range(int(top / step) + 1)]


def chart(candidates: list[dict[str, Any]], chosen: int) -> str:
    """An inline SVG scatter plot: size (x) against median latency (y), fidelity labelled."""
    points = [
        c
        for c in candidates
        if c["size_bytes"] is not None and (c["latency_ms"] or {}).get("median") is not None
    ]
    if not points:
        return "<p>No candidate was measured.</p>"
    width, height, left, bottom, pad = 720, 380, 70, 50, 20
    max_x = max(c["size_bytes"] for c in points) / 1e6 * 1.1 or 1.0
    max_y = max(c["latency_ms"]["median"] for c in points) * 1.15 or 1.0

    def x(value: float) -> float:
        return left + value / max_x * (width - left - pad)

    def y(value: float) -> float:
        return height - bottom - value / max_y * (height - bottom - pad)

    svg = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        "font-size='11' role='img' aria-label='latency against size'>",
        f"<line x1='{left}' y1='{y(0)}' x2='{width - pad}' y2='{y(0)}' stroke='#444'/>",
        f"<line x1='{left}' y1='{y(0)}' x2='{left}' y2='{pad}' stroke='#444'/>",
    ]
    for tick in _ticks(max_x):
        svg.append(
            f"<text x='{x(tick):.1f}' y='{y(0) + 15:.1f}' text-anchor='middle'>{tick:g}</text>"
        )
    for tick in _ticks(max_y):
        svg.append(
            f"<text x='{left - 6}' y='{y(tick) + 4:.1f}' text-anchor='end'>{tick:g}</text>"
            f"<line x1='{left}' y1='{y(tick):.1f}' x2='{width - pad}' y2='{y(tick):.1f}' "
            "stroke='#eee'/>"
        )
    svg.append(
        f"<text x='{(left + width) / 2}' y='{height - 12}' text-anchor='middle'>size (MB)</text>"
        f"<text x='14' y='{height / 2}' transform='rotate(-90 14 {height / 2})' "
        "text-anchor='middle'>latency median (ms)</text>"
    )
    for c in points:
        px, py = x(c["size_bytes"] / 1e6), y(c["latency_ms"]["median"])
        colour = _COLOURS.get(c["status"], "#999")
        fidelity = c["fidelity"]["score"] if c["fidelity"] else None
        title = (
            f"#{c['id']} {c['label']}: {c['status']}, {_mb(c['size_bytes'])} MB, "
            f"{c['latency_ms']['median']:.3f} ms, fidelity {_num(fidelity, 4)}"
        )
        ring = (
            f"<circle cx='{px:.1f}' cy='{py:.1f}' r='10' fill='none' stroke='#000' "
            "stroke-width='2'/>"
            if c["id"] == chosen
            else ""
        )
        svg.append(
            f"<g><title>{_e(title)}</title>{ring}<circle cx='{px:.1f}' cy='{py:.1f}' r='5' "
            f"fill='{colour}'/><text x='{px + 8:.1f}' y='{py - 6:.1f}'>#{c['id']} "
            f"f={_num(fidelity, 3)}</text></g>"
        )
    legend = [("baseline", "original"), ("accepted", "accepted"), ("rejected", "rejected")]
    for i, (status, text) in enumerate(legend):
        lx = width - pad - 260 + i * 90
        svg.append(
            f"<circle cx='{lx}' cy='{pad + 4}' r='5' fill='{_COLOURS[status]}'/>"
            f"<text x='{lx + 8}' y='{pad + 8}'>{text}</text>"
        )
    svg.append("</svg>")
    return "".join(svg)
