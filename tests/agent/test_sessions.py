"""Serving: real onnxruntime sessions loaded, smoke-tested, swapped and rolled back."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.inference import FeedError, InferenceError, NoModelError
from slimfleet.agent.sessions import Serving, SwapError, WatchPolicy
from slimfleet.agent.wire import EVENT_TYPES, ModelRef, SmokeTest

X = np.full((1, 4), 0.5, dtype=np.float32)
NO_WATCH = WatchPolicy(window_s=0)


def ref(version: int) -> ModelRef:
    return ModelRef("m", version)


def smoke_for(value: float, **kwargs: Any) -> SmokeTest:
    """The smoke test an add-``value`` model passes."""
    return SmokeTest(inputs={"x": X}, outputs={"y": X + np.float32(value)}, **kwargs)


class Recorder:
    """Collects events and callback calls from a Serving."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.fallbacks: list[tuple[ModelRef, ModelRef | None, str]] = []
        self.settled: list[ModelRef] = []
        self.changed = threading.Event()

    def on_event(self, event: dict[str, Any]) -> None:
        assert event["type"] in EVENT_TYPES, event  # every type is part of the wire format
        self.events.append(event)

    def on_fallback(self, bad: ModelRef, good: ModelRef | None, reason: str) -> None:
        self.fallbacks.append((bad, good, reason))
        self.changed.set()

    def on_settled(self, ref: ModelRef) -> None:
        self.settled.append(ref)
        self.changed.set()

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_serving(recorder: Recorder) -> Iterator[Callable[..., Serving]]:
    made: list[Serving] = []

    def make(watch: WatchPolicy = NO_WATCH, **kwargs: Any) -> Serving:
        serving = Serving(
            watch=watch,
            on_event=recorder.on_event,
            on_fallback=recorder.on_fallback,
            on_settled=recorder.on_settled,
            **kwargs,
        )
        made.append(serving)
        return serving

    yield make
    for serving in made:
        serving.close()


def value_of(outputs: dict[str, np.ndarray]) -> float:
    """Which add-constant model answered (all four elements must agree)."""
    y = outputs["y"] - X
    assert np.allclose(y, y.flat[0]), y
    return round(float(y.flat[0]), 3)


# -- requests -------------------------------------------------------------------------


def test_no_model_loaded_is_a_clear_error(make_serving) -> None:
    serving = make_serving()
    with pytest.raises(NoModelError, match="no model is loaded"):
        serving.infer({"x": X})
    assert serving.current is None and serving.io is None


def test_start_serves_at_once(make_serving, model_files) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    assert serving.current == ref(1)
    assert value_of(serving.infer({"x": X})) == 1.0
    assert serving.predict({"x": X})[0] == ref(1)
    assert serving.io.to_dict() == {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
    }


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({}, "expects inputs 'x'; got none"),
        ({"z": X}, "expects inputs 'x'; got 'z'"),
        ({"x": X, "extra": X}, "expects inputs 'x'; got 'x', 'extra'"),
        ({"x": X.astype(np.float64)}, "input 'x': expected dtype float32, got float64"),
        ({"x": np.zeros((2, 4), np.float32)}, r"input 'x': expected shape \[1, 4\], got \[2, 4\]"),
        ({"x": np.zeros((4,), np.float32)}, r"input 'x': expected shape \[1, 4\], got \[4\]"),
        ({"x": [[0.5, 0.5, 0.5, 0.5]]}, "input 'x': expected a numpy array, got list"),
        ([X], "feeds must map input names to arrays, got list"),
    ],
)
def test_wrong_feeds_say_what_is_wrong(make_serving, model_files, feeds, message) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    with pytest.raises(FeedError, match=message) as caught:
        serving.infer(feeds)
    assert isinstance(caught.value, InputError)
    assert serving.telemetry.snapshot()["errors"] == 1


def test_cast_converts_lists_to_the_input_dtype(make_serving, model_files) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    assert value_of(serving.infer({"x": X.tolist()}, cast=True)) == 1.0
    assert value_of(serving.infer({"x": X.astype(np.float64)}, cast=True)) == 1.0
    with pytest.raises(FeedError, match="cannot make a float32 array"):
        serving.infer({"x": [[1.0, 2.0], [3.0]]}, cast=True)
    with pytest.raises(FeedError, match="expected shape"):
        serving.infer({"x": [1, 2, 3, 4]}, cast=True)


def test_a_model_failing_at_run_time_raises_inference_error(make_serving, model_files) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.gather(1.0))
    zeros = np.zeros((1, 4), np.float32)
    np.testing.assert_array_equal(serving.infer({"x": zeros})["y"], zeros + 1)
    with pytest.raises(InferenceError, match=r"m@1: inference failed: .*Gather"):
        serving.infer({"x": np.full((1, 4), 5.0, np.float32)})
    snapshot = serving.telemetry.snapshot()
    assert (snapshot["requests"], snapshot["errors"]) == (2, 1)


def test_start_warms_up_on_the_given_inputs(make_serving, model_files) -> None:
    serving = make_serving()
    path = model_files.mlp()
    serving.start(ref(1), path, warmup={"x": np.zeros((2, 64), np.float32)})
    assert serving.infer({"x": np.ones((3, 64), np.float32)})["y"].shape == (3, 10)
    with pytest.raises(SwapError, match="warmup sample does not fit") as caught:
        serving.start(ref(2), path, warmup={"x": np.zeros((2, 3), np.float32)})
    assert caught.value.stage == "warmup"
    assert serving.current == ref(1)


def test_start_refuses_a_broken_file(make_serving, model_files) -> None:
    serving = make_serving()
    with pytest.raises(SwapError, match=r"m@1: load failed: .*") as caught:
        serving.start(ref(1), model_files.broken())
    assert caught.value.stage == "load"
    assert serving.current is None


def test_a_session_option_onnxruntime_refuses_is_a_load_failure(make_serving, model_files) -> None:
    serving = make_serving(threads=2**31)  # over onnxruntime's int range
    with pytest.raises(SwapError, match=r"m@1: load failed: ") as caught:
        serving.start(ref(1), model_files.add(1.0))
    assert caught.value.stage == "load"
    assert serving.current is None


# -- activation -------------------------------------------------------------------------


def test_activate_swaps_after_a_passing_smoke_test(make_serving, model_files, recorder) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    ok = serving.activate(ref(2), model_files.add(2.0), smoke_for(2.0), max_latency_ms=10_000)
    assert serving.current == ref(2)
    assert value_of(serving.infer({"x": X})) == 2.0
    assert recorder.types() == ["swap_started", "swap_ok"]
    started, done = recorder.events
    assert started["model"] == {"name": "m", "version": 2}
    assert started["from"] == {"name": "m", "version": 1}
    assert done is ok and done["from"] == {"name": "m", "version": 1}
    assert done["load_ms"] > 0 and done["smoke_ms"] > 0 and done["total_ms"] >= done["load_ms"]
    assert serving.previous == ref(1)


def test_activate_without_a_model_serving(make_serving, model_files, recorder) -> None:
    serving = make_serving()
    serving.activate(ref(1), model_files.add(1.0))
    assert serving.current == ref(1)
    assert recorder.events[0]["from"] is None


def _refused(serving: Serving, recorder: Recorder, new: ModelRef, path, **kwargs) -> SwapError:  # type: ignore[no-untyped-def]
    with pytest.raises(SwapError) as caught:
        serving.activate(new, path, **kwargs)
    assert serving.current == ref(1), "the old model must keep serving"
    assert value_of(serving.infer({"x": X})) == 1.0
    assert recorder.types() == ["swap_started", "swap_failed", "fallback"]
    failed, fallback = recorder.events[1:]
    assert failed["model"] == fallback["model"] == new.to_dict()
    assert fallback["to"] == {"name": "m", "version": 1}
    assert failed["reason"] == fallback["reason"] == caught.value.reason
    assert failed["stage"] == fallback["stage"] == caught.value.stage
    return caught.value


def test_a_model_that_fails_to_load_leaves_the_old_one(make_serving, model_files, recorder) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    error = _refused(serving, recorder, ref(2), model_files.broken(), smoke=smoke_for(2.0))
    assert error.stage == "load"
    assert "m@2: load failed" in str(error)


def test_a_wrong_smoke_output_leaves_the_old_one(make_serving, model_files, recorder) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    # The manifest promises x + 2 but the file computes x + 3.
    error = _refused(serving, recorder, ref(2), model_files.add(3.0), smoke=smoke_for(2.0))
    assert error.stage == "smoke"
    assert "output 'y' differs from the expected by up to 1" in error.reason


def test_nan_output_leaves_the_old_one(make_serving, model_files, recorder) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    error = _refused(serving, recorder, ref(2), model_files.add(float("nan")), smoke=smoke_for(2.0))
    assert error.stage == "smoke"
    assert "contains NaN or Inf" in error.reason


def test_a_smoke_sample_that_does_not_fit_leaves_the_old_one(
    make_serving, model_files, recorder
) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    smoke = SmokeTest(inputs={"input": X}, outputs={"y": X + 2})
    error = _refused(serving, recorder, ref(2), model_files.add(2.0), smoke=smoke)
    assert error.stage == "smoke" and "sample does not fit" in error.reason


def test_a_model_over_the_latency_budget_leaves_the_old_one(
    make_serving, model_files, recorder
) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    slow = model_files.slow(2.0, rows=128, width=256, depth=8)  # ~8M multiply-adds
    # The device's budget is tighter than the publisher's: the smaller one applies.
    error = _refused(
        serving,
        recorder,
        ref(2),
        slow,
        smoke=smoke_for(2.0, max_latency_ms=10_000),
        max_latency_ms=0.05,
    )
    assert error.stage == "latency"
    assert "over the budget of 0.05 ms" in error.reason


def test_the_publishers_latency_budget_applies_too(make_serving, model_files, recorder) -> None:
    serving = make_serving()
    serving.start(ref(1), model_files.add(1.0))
    slow = model_files.slow(2.0, rows=128, width=256, depth=8)
    error = _refused(serving, recorder, ref(2), slow, smoke=smoke_for(2.0, max_latency_ms=0.05))
    assert error.stage == "latency"


def test_a_failing_event_callback_does_not_break_a_swap(model_files) -> None:
    def explode(event: dict[str, Any]) -> None:
        raise RuntimeError("subscriber bug")

    with Serving(watch=NO_WATCH, on_event=explode) as serving:
        serving.activate(ref(1), model_files.add(1.0), smoke_for(1.0))
        assert serving.current == ref(1)


# -- swapping under load ----------------------------------------------------------------


@pytest.mark.parametrize(
    "watch",
    [NO_WATCH, WatchPolicy(window_s=60, min_requests=20, max_error_rate=1.0, max_p95_ratio=1e9)],
    ids=["no-watch", "watch-keeps-standby"],
)
def test_twenty_swaps_under_concurrent_requests_fail_no_request(
    make_serving, model_files, recorder, watch
) -> None:
    files = {v: model_files.add(float(v)) for v in range(1, 22)}
    serving = make_serving(watch=watch)
    serving.start(ref(1), files[1])
    stop = threading.Event()
    seen: list[list[float]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def client(out: list[float]) -> None:
        while not stop.is_set():
            try:
                out.append(value_of(serving.infer({"x": X})))
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=client, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    try:
        for v in range(2, 22):
            time.sleep(0.01)
            serving.activate(ref(v), files[v], smoke_for(float(v)))
    finally:
        time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    assert serving.current == ref(21)
    assert recorder.types() == ["swap_started", "swap_ok"] * 20
    for out in seen:
        assert out, "every client must have been served"
        assert set(out) <= set(map(float, files))
        # Swaps only go forward, and a request sees the model current when it started.
        assert out == sorted(out)
    assert max(max(out) for out in seen) == 21.0
    assert sum(len(out) for out in seen) == serving.telemetry.snapshot()["requests"]
    # Replaced sessions were released (off the swap path): only the serving one (and the
    # standby) remain.
    assert serving.drained(timeout=30)
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, ort.InferenceSession)]
    assert len(live) == (2 if watch.window_s else 1)


def test_a_swap_does_not_wait_for_the_old_session_to_drain(make_serving, model_files) -> None:
    serving = make_serving(watch=NO_WATCH)
    serving.start(ref(1), model_files.slow(1.0, rows=1024, width=512, depth=24))  # ~0.5 s
    running = threading.Thread(target=serving.infer, args=({"x": X},))
    running.start()
    deadline = time.monotonic() + 10
    while not serving._active.inflight and time.monotonic() < deadline:  # in flight on v1
        time.sleep(0.005)
    assert serving._active.inflight == 1
    serving.activate(ref(2), model_files.add(2.0), smoke_for(2.0))
    assert serving.current == ref(2)
    assert not serving.drained(timeout=0)  # version 1 is still draining behind the swap
    running.join(timeout=30)
    assert serving.drained(timeout=30)


@pytest.mark.parametrize("watch", [NO_WATCH, WatchPolicy(window_s=60)], ids=["drain", "standby"])
def test_an_in_flight_request_finishes_on_the_old_session(make_serving, model_files, watch) -> None:
    serving = make_serving(watch=watch)
    old = model_files.slow(1.0, rows=1024, width=512, depth=24)  # ~0.5 s per request
    serving.start(ref(1), old)
    result: dict[str, Any] = {}

    def slow_request() -> None:
        result["start"] = time.time()
        result["outputs"] = serving.infer({"x": X})
        result["end"] = time.time()

    thread = threading.Thread(target=slow_request)
    thread.start()
    while "start" not in result:
        time.sleep(0.001)
    time.sleep(0.05)
    before = time.time()
    ok = serving.activate(ref(2), model_files.add(2.0), smoke_for(2.0))
    assert value_of(serving.infer({"x": X})) == 2.0  # new requests go to the new model
    thread.join(timeout=60)
    assert result["start"] < before < result["end"], "the request must span the swap"
    if watch.window_s:  # activate() did not wait, so the swap happened mid-request
        assert result["end"] > ok["ts"]
    assert value_of(result["outputs"]) == 1.0
    assert result["outputs"]["work"].shape == (1024, 512)


# -- watch window ------------------------------------------------------------------------


def _serve_until(serving: Serving, done: threading.Event, feeds: dict[str, np.ndarray]) -> list:
    """Send requests until ``done``; return the exceptions of failed ones."""
    errors = []
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        try:
            serving.infer(feeds)
        except SlimfleetError as exc:
            errors.append(exc)
    return errors


def test_watch_window_rolls_back_a_slower_model(make_serving, model_files, recorder) -> None:
    serving = make_serving(watch=WatchPolicy(window_s=60, min_requests=20, max_p95_ratio=1.5))
    serving.start(ref(1), model_files.add(1.0))
    for _ in range(200):  # the baseline: the old model's recent latency
        serving.infer({"x": X})
    # Same answers, but ~16M multiply-adds more per request.
    serving.activate(ref(2), model_files.slow(1.0, rows=64, width=512, depth=8), smoke_for(1.0))
    assert serving.current == ref(2)
    errors = _serve_until(serving, recorder.changed, {"x": X})
    assert errors == []
    assert serving.current == ref(1)
    assert value_of(serving.infer({"x": X})) == 1.0
    [(bad, good, reason)] = recorder.fallbacks
    assert (bad, good) == (ref(2), ref(1))
    assert reason.startswith("p95 latency") and "allowed x1.5" in reason
    fallback = recorder.events[-1]
    assert fallback["type"] == "fallback" and fallback["stage"] == "watch"
    assert fallback["model"] == {"name": "m", "version": 2}
    assert fallback["to"] == {"name": "m", "version": 1}
    assert recorder.settled == []
    assert serving.previous is None


def test_watch_window_rolls_back_an_erroring_model(make_serving, model_files, recorder) -> None:
    serving = make_serving(watch=WatchPolicy(window_s=60, min_requests=20, max_error_rate=0.05))
    serving.start(ref(1), model_files.add(1.0))
    traffic = {"x": np.full((1, 4), 5.0, np.float32)}
    for _ in range(50):
        serving.infer(traffic)
    # Passes its smoke test (zeros) but fails on the inputs real clients send.
    zeros = np.zeros((1, 4), np.float32)
    smoke = SmokeTest(inputs={"x": zeros}, outputs={"y": zeros + 1})
    serving.activate(ref(2), model_files.gather(1.0), smoke)
    errors = _serve_until(serving, recorder.changed, traffic)
    assert errors and all(isinstance(e, InferenceError) for e in errors)
    assert serving.current == ref(1)
    serving.infer(traffic)
    [(bad, good, reason)] = recorder.fallbacks
    assert (bad, good) == (ref(2), ref(1))
    assert reason.startswith("error rate 100.0%") and "vs 0.0% before" in reason


def test_a_model_that_holds_up_settles_and_can_still_be_rolled_back(
    make_serving, model_files, recorder
) -> None:
    serving = make_serving(watch=WatchPolicy(window_s=0.3, min_requests=20, max_p95_ratio=1e9))
    serving.start(ref(1), model_files.add(1.0))
    serving.activate(ref(2), model_files.add(2.0), smoke_for(2.0))
    errors = _serve_until(serving, recorder.changed, {"x": X})
    assert errors == [] and recorder.settled == [ref(2)] and recorder.fallbacks == []
    assert serving.current == ref(2) and serving.previous == ref(1)
    # The previous session was released when the window closed: rollback loads it again.
    assert serving.rollback("operator asked") == ref(1)
    assert value_of(serving.infer({"x": X})) == 1.0
    assert recorder.fallbacks == [(ref(2), ref(1), "operator asked")]
    assert recorder.events[-1] | {"ts": 0} == {
        "type": "fallback",
        "ts": 0,
        "model": {"name": "m", "version": 2},
        "to": {"name": "m", "version": 1},
        "stage": "rollback",
        "reason": "operator asked",
    }
    with pytest.raises(SlimfleetError, match="no previous model"):
        serving.rollback()


def test_rollback_during_the_watch_window_uses_the_loaded_standby(
    make_serving, model_files, tmp_path
) -> None:
    serving = make_serving(watch=WatchPolicy(window_s=60))
    old = model_files.add(1.0)
    serving.start(ref(1), old)
    serving.activate(ref(2), model_files.add(2.0), smoke_for(2.0))
    old.unlink()  # the standby is still in memory, so the file is not needed
    assert serving.rollback() == ref(1)
    assert value_of(serving.infer({"x": X})) == 1.0


def test_close_releases_everything(make_serving, model_files) -> None:
    serving = make_serving(watch=WatchPolicy(window_s=60))
    serving.start(ref(1), model_files.add(1.0))
    serving.activate(ref(2), model_files.add(2.0))
    serving.close()
    with pytest.raises(NoModelError):
        serving.infer({"x": X})
    with pytest.raises(SlimfleetError, match="closed"):
        serving.activate(ref(3), model_files.add(3.0))
    assert serving.telemetry.snapshot()["model"] is None
