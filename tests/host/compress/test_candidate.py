from __future__ import annotations

from slimfleet.host.compress.candidate import FAILED, Candidate, StepRecord
from slimfleet.host.compress.evaluate import Measurement
from slimfleet.host.compress.fidelity import Fidelity, OutputFidelity


def test_a_measured_candidate_as_a_report_row():
    candidate = Candidate(3, "fp16", "fp16", "normalize > fp16", "half floats", parent=1)
    candidate.steps = [StepRecord("fp16", {"keep_ops": []}, "applied", "47 weights", 1.23456)]
    candidate.size_bytes = 1000
    candidate.measurement = Measurement(
        load_ms=5.0,
        latency_ms={"median": 2.0, "p90": 3.0, "runs": 10, "method": "alone"},
        peak_memory_bytes=4096,
        outputs=[{"y": object()}],
    )
    candidate.fidelity = Fidelity(
        [OutputFidelity("y", "cosine", 0.999, 40, (0.998, 1.0), "bootstrap", cosine=0.999)]
    )
    candidate.metrics = {"ctc_text": 1.0}
    row = candidate.to_dict()
    assert candidate.latency_ms == 2.0
    assert row["steps"] == [
        {
            "pass": "fp16",
            "options": {"keep_ops": []},
            "status": "applied",
            "notes": "47 weights",
            "seconds": 1.235,
            "auto": False,
        }
    ]
    assert row["latency_ms"]["median"] == 2.0 and row["load_ms"] == 5.0
    assert row["peak_memory_bytes"] == 4096 and row["parent"] == 1
    assert row["fidelity"] == {
        "score": 0.999,
        "problem": None,
        "outputs": {
            "y": {
                "metric": "cosine",
                "score": 0.999,
                "samples": 40,
                "interval": [0.998, 1.0],
                "interval_method": "bootstrap",
                "detected": True,
                "step_agreement": None,
                "cosine": 0.999,
                "max_abs_error": None,
            }
        },
    }
    assert "outputs" not in row and "path" not in row
    assert row["undecided"] == []


def test_an_unmeasured_candidate_has_empty_figures():
    candidate = Candidate(1, "x", "x", "x", status=FAILED, reason="boom")
    row = candidate.to_dict()
    assert candidate.latency_ms is None
    assert row["latency_ms"] is None and row["fidelity"] is None and row["size_bytes"] is None
    assert (row["status"], row["reason"]) == (FAILED, "boom")
