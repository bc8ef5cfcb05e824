"""The watch policy as pure functions of per-slot statistics, and the watch window of a
DeploymentServer on real sessions."""

from __future__ import annotations

import threading
import time

import models
import numpy as np
import pytest
from serving_rig import X, current, infer, loaded, main, ref, serve, smoke_for, value_of

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.inference import FeedError, InferenceError
from slimfleet.agent.serving import DeploymentServer
from slimfleet.agent.watch import FAILED, Baseline, WatchPolicy, baseline, judge, regression
from slimfleet.agent.wire import SmokeTest

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


# -- watch window ------------------------------------------------------------------------


def _serve_until(server: DeploymentServer, done: threading.Event, feeds: dict) -> list:
    """Send requests until ``done``; return the exceptions of failed ones."""
    errors = []
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        try:
            infer(server, feeds)
        except SlimfleetError as exc:
            errors.append(exc)
    return errors


def test_watch_window_rolls_back_a_slower_deployment(make_serving, model_files, recorder) -> None:
    server = make_serving(watch=WatchPolicy(window_s=60, min_requests=20, max_p95_ratio=1.5))
    serve(server, 1, model_files.add(1.0))
    for _ in range(200):  # the baseline: the old deployment's recent latency
        infer(server)
    # Same answers, but MatMuls worth ~10 ms more per request on this machine: over the
    # watch's 2 ms noise floor and x1.5 wherever it runs.
    depth = models.matmul_depth(10, rows=64, width=512)
    serve(server, 2, model_files.slow(1.0, rows=64, width=512, depth=depth), smoke_for(1.0))
    assert current(server) == ref(2)
    assert _serve_until(server, recorder.changed, {"x": X}) == []
    assert current(server) == ref(1) and value_of(infer(server)) == 1.0
    [(bad, good, reason)] = recorder.fallbacks
    assert (bad, good) == (main(2), main(1))
    assert reason.startswith("slot main: p95 latency") and "allowed x1.5" in reason
    fallback = recorder.events[-1]
    assert fallback["type"] == "fallback" and fallback["stage"] == "watch"
    assert fallback["deployment"] == loaded(2) and fallback["to"] == loaded(1)
    assert recorder.settled == []


def test_watch_window_rolls_back_an_erroring_deployment(
    make_serving, model_files, recorder
) -> None:
    server = make_serving(watch=WatchPolicy(window_s=60, min_requests=20, max_error_rate=0.05))
    serve(server, 1, model_files.add(1.0))
    traffic = {"x": np.full((1, 4), 5.0, np.float32)}
    for _ in range(50):
        infer(server, traffic)
    # Passes its smoke test (zeros) but fails on the inputs real clients send.
    zeros = np.zeros((1, 4), np.float32)
    serve(server, 2, model_files.gather(1.0), SmokeTest({"x": zeros}, {"y": zeros + 1}))
    errors = _serve_until(server, recorder.changed, traffic)
    assert errors and all(isinstance(e, InferenceError) for e in errors)
    assert current(server) == ref(1)
    infer(server, traffic)
    [(bad, good, reason)] = recorder.fallbacks
    assert (bad, good) == (main(2), main(1))
    assert reason.startswith("slot main: error rate 100.0%") and "vs 0.0% before" in reason


def test_requests_no_version_could_run_never_roll_back_a_deployment(
    make_serving, model_files, recorder
) -> None:
    """a [2, 4] and b [3, 4] share the free dimension 'batch' and cannot be added: a
    stranger's 40 such requests once rolled a new deployment back for good. Shapes the
    slot never answered are the request's fault (400), not the model's."""
    server = make_serving(watch=WatchPolicy(window_s=0.5, min_requests=20, max_error_rate=0.05))
    serve(server, 1, model_files.two_inputs())
    serve(server, 2, model_files.two_inputs())
    bad = {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)}
    for _ in range(40):
        with pytest.raises(FeedError, match="has never answered inputs shaped a \\[2, 4\\]"):
            infer(server, bad)
    assert recorder.changed.wait(10)
    assert recorder.settled == [main(2)] and recorder.fallbacks == []
    good = {"a": np.ones((2, 4), np.float32), "b": np.ones((2, 4), np.float32)}
    assert (infer(server, good)["y"] == 2).all()


def test_client_errors_never_roll_back_a_deployment(make_serving, model_files, recorder) -> None:
    server = make_serving(watch=WatchPolicy(window_s=0.5, min_requests=20, max_error_rate=0.05))
    serve(server, 1, model_files.add(1.0))
    serve(server, 2, model_files.add(2.0))
    for _ in range(100):
        with pytest.raises(FeedError):
            infer(server, {"x": np.zeros((7, 7), np.float32)})
    assert recorder.changed.wait(10)
    assert recorder.settled == [main(2)] and recorder.fallbacks == []


def test_a_deployment_that_holds_up_settles_and_releases_the_old(
    make_serving, model_files, recorder
) -> None:
    server = make_serving(watch=WatchPolicy(window_s=0.3, min_requests=20, max_p95_ratio=1e9))
    serve(server, 1, model_files.add(1.0))
    serve(server, 2, model_files.add(2.0), smoke_for(2.0))
    assert _serve_until(server, recorder.changed, {"x": X}) == []
    assert recorder.settled == [main(2)] and recorder.fallbacks == []
    assert current(server) == ref(2) and server._standby is None
    assert server.drained(timeout=30)
