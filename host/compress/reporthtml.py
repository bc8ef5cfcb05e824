"""``report.html``: the report as one self-contained page (no scripts, no network), and
the sentences it shares with the CLI (:func:`output_line`, :func:`undecided_notes`).

A summary, an inline SVG chart of latency against size whose labels are placed so they
never overlap, and the candidates' table. The table puts the figures people compare
(status, size, latency, fidelity with its sample count and 95% interval, task metrics)
first; the recipe's expandable steps and the reason come after them with a bounded
width, so opening a row's details grows it downwards and keeps the figures in view.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:90em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.recipe{max-width:24em;overflow-wrap:anywhere} td.reason{max-width:28em;overflow-wrap:anywhere}
tr.chosen{background:#e8f6e8;font-weight:600} .warn{background:#fff3cd;border:2px solid #e0a800;
padding:.6em 1em;font-weight:600} .accepted{color:#1a7f37} .rejected{color:#b35900}
.failed{color:#c62828} .skipped{color:#777} .baseline{color:#1f5fbf}
.undecided{color:#8a5a00;font-weight:600} small.ci{color:#555;font-weight:normal}
details summary{cursor:pointer} code{font-size:.9em}
"""

_COLOURS = {"baseline": "#1f5fbf", "accepted": "#1a7f37", "rejected": "#e07000"}

FONT_PX = 11
"""The chart's font size; label boxes are estimated at :data:`CHAR_PX` per character."""
CHAR_PX = 6.6


def output_line(name: str, figures: dict[str, Any]) -> str:
    """One output's verdict in words: metric, score, sample count, 95% interval."""
    text = f"output {name}: {figures['metric']} {figures['score']:.4f} over {figures['samples']}"
    text += " samples"
    if figures.get("interval"):
        low, high = figures["interval"]
        text += f", 95% interval [{low:.4f}, {high:.4f}] ({figures['interval_method']})"
    if figures.get("step_agreement") is not None:
        text += f", per-step agreement {figures['step_agreement']:.4f}"
    return text


def undecided_lines(candidate: dict[str, Any], budget: float) -> list[str]:
    """For each output whose interval holds the budget: what it means, and the remedy."""
    lines = []
    for entry in candidate.get("undecided", []):
        low, high = entry["interval"]
        needed = entry["samples_to_settle"]
        remedy = (
            f"about {needed} samples would settle it"
            if needed
            else "no amount of data settles a score this close to the budget"
        )
        lines.append(
            f"output {entry['output']}: the 95% interval [{low:.4f}, {high:.4f}] holds the "
            f"budget {budget}, so {entry['samples']} samples cannot tell; {remedy}"
        )
    return lines


def undecided_notes(doc: dict[str, Any]) -> list[str]:
    """The chosen candidate's undecided outputs in words, and how many others are undecided
    (each is marked in the table and listed under ``undecided`` in report.json)."""
    budget, chosen = doc["summary"]["fidelity_budget"], doc["choice"]["candidate"]
    by_id = {c["id"]: c for c in doc["candidates"]}
    notes = [f"#{chosen} (chosen): {t}" for t in undecided_lines(by_id[chosen], budget)]
    others = [c for c in doc["candidates"] if c["undecided"] and c["id"] != chosen]
    if others:
        ids = ", ".join(f"#{c['id']}" for c in others)
        notes.append(
            f"{len(others)} other candidate(s) ({ids}) have an interval holding the budget "
            "too: their verdict could flip with more data"
        )
    return notes


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
        f"</p><p><b>{_e(summary.get('ratios', ''))}</b>: size {_mb(summary['size_bytes'])} MB, "
        f"latency {_num(summary['latency_ms'])} ms, "
        f"fidelity {_num(summary['fidelity'], 4)} (budget {summary['fidelity_budget']}, "
        f"objective {_e(summary['objective'])}, {summary['threads']} thread(s), "
        f"data: {_e(doc['samples']['source'])}, {doc['samples']['evaluation']} evaluation / "
        f"{doc['samples']['calibration']} calibration samples). "
        f"Search took {doc['elapsed_seconds']:.1f} s.</p>"
    )
    parts += [f"<p class=undecided>Undecided: {_e(n)}</p>" for n in undecided_notes(doc)]
    parts.append("<h2>Latency against size</h2>")
    parts.append(chart(doc["candidates"], choice["candidate"]))
    parts.append("<h2>Candidates</h2>")
    parts.append(table(doc["candidates"], choice["candidate"]))
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
    """The score, then per output: metric, sample count and 95% interval."""
    fidelity = candidate["fidelity"]
    if not fidelity:
        return "–"
    lines = []
    for name, figures in fidelity["outputs"].items():
        interval = figures.get("interval")
        ci = f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
        lines.append(
            f"<br><small class=ci>{_e(name)}: {_e(figures['metric'])} "
            f"{figures['score']:.4f}, n={figures['samples']}{ci}</small>"
        )
    flag = " <span class=undecided title='interval holds the budget'>?</span>"
    return f"{fidelity['score']:.4f}{flag if candidate.get('undecided') else ''}{''.join(lines)}"


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


def table(candidates: list[dict[str, Any]], chosen: int) -> str:
    """The candidates' table: figures first, then the recipe's steps and the reason."""
    head = (
        "<tr><th>#</th><th>status</th><th>size MB</th><th>latency ms<br>median / p90</th>"
        "<th>fidelity<br><small>per output: metric, n, 95% interval</small></th>"
        "<th>metrics</th><th>memory MB</th><th>load ms</th><th>recipe</th><th>reason</th></tr>"
    )
    rows = []
    for c in candidates:
        latency = c["latency_ms"] or {}
        metrics = ", ".join(f"{_e(k)} {v:.4f}" for k, v in c["metrics"].items()) or "–"
        rows.append(
            f"<tr{' class=chosen' if c['id'] == chosen else ''}><td class=n>{c['id']}</td>"
            f"<td class={_e(c['status'])}>{_e(c['status'])}</td>"
            f"<td class=n>{_mb(c['size_bytes'])}</td>"
            f"<td class=n>{_num(latency.get('median'))} / {_num(latency.get('p90'))}</td>"
            f"<td class=n>{_fidelity_cell(c)}</td><td>{metrics}</td>"
            f"<td class=n>{_mb(c['peak_memory_bytes'])}</td>"
            f"<td class=n>{_num(c['load_ms'], 1)}</td>"
            f"<td class=recipe>{_steps(c)}</td><td class=reason>{_e(c['reason'])}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _ticks(top: float, count: int = 6) -> list[float]:
    step = 10 ** math.floor(math.log10(top / count)) if top > 0 else 1
    for factor in (1, 2, 5, 10):
        if top / (step * factor) <= count:
            step *= factor
            break
    return [i * step for i in range(int(top / step) + 1)]


Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in SVG pixels."""


def _overlaps(box: Box, others: Iterable[Box]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def place_labels(
    points: list[tuple[float, float, str]], area: Box
) -> list[tuple[float, float, Box]]:
    """Text anchors ``(x, y, box)`` for labels at ``points`` ``(px, py, text)``, in order.

    Greedy: each label takes the first spot around its point, at growing distances,
    whose box stays in ``area`` and overlaps no label placed before and no point.
    Boxes are estimated from the text length (:data:`CHAR_PX`, :data:`FONT_PX`).
    """
    dots: list[Box] = [(px - 5, py - 5, px + 5, py + 5) for px, py, _ in points]
    placed: list[Box] = []
    anchors = []
    for px, py, text in points:
        width = len(text) * CHAR_PX
        spots = [
            spot
            for gap in (0, 12, 26, 42, 60, 84)
            for spot in (
                (px + 8 + gap, py - 6),
                (px + 8 + gap, py + 14),
                (px - 8 - width - gap, py - 6),
                (px - 8 - width - gap, py + 14),
                (px - width / 2, py - 10 - gap),
                (px - width / 2, py + 20 + gap),
            )
        ]
        choice = None
        for x, y in spots:
            box = (x, y - FONT_PX, x + width, y + 2)
            inside = (
                area[0] <= box[0] and box[2] <= area[2] and area[1] <= box[1] and box[3] <= area[3]
            )
            if inside and not _overlaps(box, placed) and not _overlaps(box, dots):
                choice = (x, y, box)
                break
        if choice is None:  # crowded beyond all spots: stack below the lowest label
            lowest = max((b[3] for b in placed), default=area[1])
            x = min(max(area[0], px + 8), area[2] - width)
            y = lowest + FONT_PX + 2
            choice = (x, y, (x, y - FONT_PX, x + width, y + 2))
        placed.append(choice[2])
        anchors.append(choice)
    return anchors


def chart(candidates: list[dict[str, Any]], chosen: int) -> str:
    """An inline SVG scatter plot: size (x) against median latency (y), fidelity labelled."""
    points = [
        c
        for c in candidates
        if c["size_bytes"] is not None and (c["latency_ms"] or {}).get("median") is not None
    ]
    if not points:
        return "<p>No candidate was measured.</p>"
    width, height, left, bottom, pad = 760, 400, 70, 50, 20
    max_x = max(c["size_bytes"] for c in points) / 1e6 * 1.1 or 1.0
    max_y = max(c["latency_ms"]["median"] for c in points) * 1.15 or 1.0

    def x(value: float) -> float:
        return left + value / max_x * (width - left - pad)

    def y(value: float) -> float:
        return height - bottom - value / max_y * (height - bottom - pad - 20)

    svg = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"font-size='{FONT_PX}' role='img' aria-label='latency against size'>",
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
    coords = [(x(c["size_bytes"] / 1e6), y(c["latency_ms"]["median"])) for c in points]
    texts = [
        f"#{c['id']} f={_num(c['fidelity']['score'] if c['fidelity'] else None, 3)}" for c in points
    ]
    legend_top = pad + 14  # the legend row sits above the plot area
    anchors = place_labels(
        [(px, py, t) for (px, py), t in zip(coords, texts, strict=True)],
        (left + 2, legend_top, width - 2, y(0) - 2),
    )
    for c, (px, py), text, (lx, ly, _) in zip(points, coords, texts, anchors, strict=True):
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
        far = abs(lx - px) > 40 or abs(ly - py) > 30
        leader = (
            f"<line x1='{px:.1f}' y1='{py:.1f}' x2='{lx:.1f}' y2='{ly - 4:.1f}' stroke='#bbb'/>"
            if far
            else ""
        )
        svg.append(
            f"<g><title>{_e(title)}</title>{ring}{leader}<circle cx='{px:.1f}' cy='{py:.1f}' "
            f"r='5' fill='{colour}'/><text class='label' x='{lx:.1f}' y='{ly:.1f}'>"
            f"{_e(text)}</text></g>"
        )
    legend = [("baseline", "original"), ("accepted", "accepted"), ("rejected", "rejected")]
    for i, (status, text) in enumerate(legend):
        lx = width - pad - 260 + i * 90
        svg.append(
            f"<circle cx='{lx}' cy='{pad - 4}' r='5' fill='{_COLOURS[status]}'/>"
            f"<text x='{lx + 8}' y='{pad}'>{text}</text>"
        )
    svg.append("</svg>")
    return "".join(svg)
