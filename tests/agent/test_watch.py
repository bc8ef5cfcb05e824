"""The watch policy as pure functions of per-slot statistics."""

from __future__ import annotations

import numpy as np
import pytest

from slimfleet.agent.watch import FAILED, Baseline, WatchPolicy, baseline, judge, regression

POLICY = WatchPolicy(window_s=30, min_requests=20, max_error_rate=0.05, max_p95_ratio=1.5)


def samples(ok: int, failed: int = 0, latency_s: float = 0.01) -> np.ndarray:
    return np.array([latency_s] * ok + [FAILED] * failed)


def test_a_baseline_needs_enough_requests() -> None:
    assert baseline(POLICY, samples(10)) == Baseline()
    base = baseline(POLICY, samples(90, 10))
    assert base.error_rate == pytest.approx(0.1) and base.p95_s == pytest.approx(0.01)
    assert baseline(POLICY, samples(5, 30)).p95_s is None  # too few successes for a p95


@pytest.mark.parametrize(
    ("new", "base", "expected"),
    [
        (samples(10, 9), Baseline(), None),  # too few requests to judge
        (samples(90, 10), Baseline(0.0, 0.01), "error rate 10.0%"),
        (samples(90, 10), Baseline(0.08, 0.01), None),  # was as bad before
        (samples(100, 0, 0.02), Baseline(0.0, 0.01), "p95 latency 20 ms vs 10 ms"),
        (samples(100, 0, 0.014), Baseline(0.0, 0.01), None),  # within x1.5
        (samples(100, 0, 0.5), Baseline(0.0, None), None),  # no latency bound known
    ],
    ids=["few", "errors", "errors-as-before", "slower", "within-ratio", "no-base-p95"],
)
def test_regression(new: np.ndarray, base: Baseline, expected: str | None) -> None:
    reason = regression(POLICY, new, base)
    assert (reason is None) == (expected is None)
    if expected is not None:
        assert reason.startswith(expected)


def test_judge_rolls_back_on_any_slot_and_settles_after_the_window() -> None:
    good, bad = samples(50), samples(40, 10)
    verdict = judge(POLICY, 5.0, {"det": good, "rec": bad}, {"det": Baseline(), "rec": Baseline()})
    assert verdict.rollback is not None and verdict.rollback.startswith("slot rec: error rate")
    assert not judge(POLICY, 5.0, {"det": good}, {}).settled  # still watching
    assert judge(POLICY, 30.0, {"det": good, "new": good}, {"det": Baseline()}).settled
