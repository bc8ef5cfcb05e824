from __future__ import annotations

import errno
import json
import os
import re
from xml.etree import ElementTree

import models
import numpy as np
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import outdir, report, reporthtml
from slimfleet.host.compress.evaluate import EvalSettings
from slimfleet.host.compress.search import compress
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.plugins import load_plugins, make_plugin_manager
from slimfleet.host.sections import ReportSection


class FleetNotes:
    """A report-section plugin that reads the finished report."""

    @hookimpl
    def slimfleet_report_section(self, report):
        chosen = report["choice"]["label"]
        return ReportSection(
            "Fleet notes <&>",
            f"{len(report['candidates'])} candidates; shipping {chosen}.",
            {"devices": 12, "waves": [1, 5, 6]},
        )


class Silent:
    @hookimpl
    def slimfleet_report_section(self, report):
        return None


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One real compress run with a report-section plugin."""
    tmp = tmp_path_factory.mktemp("report")
    pm = make_plugin_manager(entry_points=False)
    pm.register(FleetNotes())
    pm.register(Silent())
    data = tmp / "data.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(6, 1, 64)).astype(np.float32))
    result = compress(
        models.save(models.mlp(), tmp / "mlp.onnx"),
        tmp / "out",
        data=data,
        passes="normalize,simplify",
        plugins=load_plugins(pm),
        settings=EvalSettings.quick(),
    )
    return result


def test_report_json_holds_every_candidate_and_the_summary(finished):
    doc = json.loads((finished.outdir / "report.json").read_text())
    assert doc == finished.data
    assert [c["id"] for c in doc["candidates"]] == [0, 1]
    candidate = doc["candidates"][1]
    assert candidate["pipeline"] == "normalize > simplify"
    assert [s["pass"] for s in candidate["steps"]] == ["normalize", "simplify"]
    for key in ("size_bytes", "load_ms", "latency_ms", "peak_memory_bytes", "fidelity", "status"):
        assert key in candidate
    assert set(candidate["latency_ms"]) == {"median", "p90", "runs", "method"}
    assert set(candidate["fidelity"]["outputs"]["y"]) == {
        "metric", "score", "samples", "interval", "interval_method", "detected",
        "step_agreement", "cosine", "max_abs_error",
    }  # fmt: skip
    summary = doc["summary"]
    for key in ("chosen", "size_ratio", "latency_ratio", "fidelity", "kept_original", "metrics"):
        assert key in summary
    assert summary["fidelity_budget"] == 0.99 and summary["objective"] == "latency"
    assert doc["choice"]["reason"]
    assert doc["samples"] == {"source": doc["settings"]["data"], "calibration": 3, "evaluation": 3}
    assert summary["data"] == doc["settings"]["data"]
    assert doc["model"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]


def test_plugin_sections_reach_json_and_html(finished):
    (section,) = finished.data["sections"]
    assert section == {
        "title": "Fleet notes <&>",
        "text": f"2 candidates; shipping {finished.data['choice']['label']}.",
        "data": {"devices": 12, "waves": [1, 5, 6]},
    }
    page = (finished.outdir / "report.html").read_text()
    assert "<h2>Fleet notes &lt;&amp;&gt;</h2>" in page
    assert "<th>waves</th><td>[1, 5, 6]</td>" in page


def test_html_is_self_contained(finished):
    page = (finished.outdir / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<svg" in page and "<table>" in page
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)\s*=", page, re.I)
    assert not re.search(r"url\(|@import", page, re.I)
    assert re.findall(r"https?://[^'\"\s]+", page) == ["http://www.w3.org/2000/svg"]


def test_sample_npz_is_one_evaluation_sample(finished):
    with np.load(finished.outdir / "sample.npz") as sample:
        assert sample.files == ["x"] and sample["x"].shape == (1, 64)


def _candidate(id_, status, size, latency, fidelity, label="r"):
    return {
        "id": id_,
        "label": label,
        "pipeline": label,
        "status": status,
        "size_bytes": size,
        "latency_ms": {"median": latency, "p90": latency} if latency is not None else None,
        "load_ms": 1.0,
        "peak_memory_bytes": 10**6,
        "fidelity": {"score": fidelity, "problem": None, "outputs": {}} if fidelity else None,
        "metrics": {},
        "reason": "",
        "steps": [],
    }


def test_chart_plots_measured_candidates_and_rings_the_choice():
    candidates = [
        _candidate(0, "baseline", 54_000_000, 15.6, 1.0),
        _candidate(1, "accepted", 16_000_000, 10.1, 0.995),
        _candidate(2, "rejected", 13_600_000, 35.9, 0.991),
        _candidate(3, "failed", None, None, None),
    ]
    svg = reporthtml.chart(candidates, chosen=1)
    assert svg.count("r='5'") == 3 + 3  # three points and the three legend dots
    assert svg.count("r='10'") == 1
    assert "#1 f=0.995" in svg and "#2 f=0.991" in svg and "#3" not in svg
    assert "fill='#e07000'" in svg  # rejected in orange
    assert ">size (MB)<" in svg and ">latency median (ms)<" in svg
    root = ElementTree.fromstring(svg)  # well-formed SVG
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_chart_without_measurements():
    assert reporthtml.chart([_candidate(0, "failed", None, None, None)], 0) == (
        "<p>No candidate was measured.</p>"
    )


def test_labels_are_escaped_in_the_table():
    html = reporthtml.table([_candidate(0, "baseline", 10, 1.0, 1.0, label="<b>x</b>")], 0)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


@pytest.mark.parametrize(
    ("top", "ticks"), [(54.1, [0, 10, 20, 30, 40, 50]), (0.9, [0, 0.2, 0.4, 0.6, 0.8])]
)
def test_ticks(top, ticks):
    assert reporthtml._ticks(top) == pytest.approx(ticks)


def test_write_replaces_files_atomically(tmp_path, finished):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    (out / "model.onnx.data").write_bytes(b"an earlier output's external data")
    model = models.save(models.add_one(), tmp_path / "new.onnx")
    report.write(out, finished.data, model, {"x": np.zeros((1, 4), np.float32)})
    assert (out / "model.onnx").read_bytes() == model.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [
        "model.onnx", "report.html", "report.json", "sample.npz"
    ]  # fmt: skip


def test_write_failure_is_one_line_and_leaves_no_temp_file(tmp_path, finished):
    out = tmp_path / "out"
    (out / "report.json").mkdir(parents=True)  # a directory where the file should go
    with pytest.raises(InputError, match=r"report\.json: cannot write"):
        report.write(
            out,
            finished.data,
            models.save(models.add_one(), tmp_path / "m.onnx"),
            {"x": np.zeros((1, 4), np.float32)},
        )
    assert [p.name for p in out.iterdir()] == ["report.json"]  # all or nothing: as it was


def test_a_full_disk_leaves_the_earlier_output_as_it_was(tmp_path, finished, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()  # compress made it before the search (outdir.prepare)
    model = models.save(models.add_one(), tmp_path / "m.onnx")
    sample = {"x": np.zeros((1, 4), np.float32)}
    report.write(out, finished.data, model, sample)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written = outdir.write_atomic

    def disk_full_at_the_html(path, data):
        if path.name == "report.html":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written(path, data)

    monkeypatch.setattr(outdir, "write_atomic", disk_full_at_the_html)
    other = models.save(models.mlp(), tmp_path / "other.onnx")
    with pytest.raises(InputError, match=r"out/report\.html: cannot write \(No space left"):
        report.write(out, {**finished.data, "elapsed_seconds": 99.0}, other, sample)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging left


def test_a_section_that_is_not_a_report_section_is_a_plugin_bug(finished):
    class Wrong:
        @hookimpl
        def slimfleet_report_section(self, report):
            return {"title": "dict"}

    pm = make_plugin_manager(entry_points=False)
    pm.register(Wrong())
    with pytest.raises(TypeError, match="returned dict"):
        report.sections(pm.hook, finished.data)


def test_undecided_notes_speak_for_the_choice_and_count_the_others():
    entry = {"output": "y", "interval": [0.8389, 1.0], "samples": 20, "samples_to_settle": 35}
    doc = {
        "summary": {"fidelity_budget": 0.9},
        "choice": {"candidate": 1},
        "candidates": [
            {"id": 0, "undecided": []},
            {"id": 1, "undecided": [entry]},
            {"id": 2, "undecided": [{**entry, "samples_to_settle": None}]},
        ],
    }
    assert reporthtml.undecided_notes(doc) == [
        "#1 (chosen): output y: the 95% interval [0.8389, 1.0000] holds the budget 0.9, so "
        "20 samples cannot tell; about 35 samples would settle it",
        "1 other candidate(s) (#2) have an interval holding the budget too: their verdict "
        "could flip with more data",
    ]
    doc["choice"]["candidate"] = 2
    assert reporthtml.undecided_notes(doc)[0].endswith(
        "no amount of data settles a score this close to the budget"
    )
