"""DeploymentServer and sessions: real onnxruntime sessions loaded, smoke-tested, switched."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from serving_rig import (
    NO_WATCH,
    X,
    current,
    infer,
    loaded,
    ref,
    serve,
    smoke_for,
    value_of,
)

from slimfleet.agent.deployment import SlotSpec
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.inference import FeedError, InferenceError, NoModelError, UnknownSlotError
from slimfleet.agent.serving import DeploymentError, DeploymentServer, ModelSource
from slimfleet.agent.watch import WatchPolicy
from slimfleet.agent.wire import SmokeTest

# -- requests -------------------------------------------------------------------------


def test_nothing_serving_is_a_clear_error(make_serving) -> None:
    server = make_serving()
    with pytest.raises(NoModelError, match="no deployment is serving yet"):
        infer(server)
    assert server.current() is None and server.slots() == [] and not server.ready()


def test_a_deployment_serves_at_once(make_serving, model_files) -> None:
    server = make_serving()
    serve(server, 1, model_files.add(1.0), watch=False)
    assert current(server) == ref(1) and server.slots() == ["main"] and server.ready()
    assert value_of(infer(server)) == 1.0
    answer = server.predict("main", {"x": X})
    assert answer.model == ref(1) and answer.tier == "m@1" and answer.escalations == 0
    assert server.slot_model("main") == ref(1)
    assert server.slot_io("main").to_dict() == {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
    }
    with pytest.raises(UnknownSlotError, match="no slot 'det'"):
        server.slot_io("det")
    with pytest.raises(UnknownSlotError):
        server.predict("det", {"x": X})
    assert b'slimfleet_agent_requests_total{slot="main"} 2.0' in server.metrics_text()


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
def test_wrong_feeds_say_what_is_wrong_and_are_client_errors(
    make_serving, model_files, feeds, message
) -> None:
    server = make_serving()
    serve(server, 1, model_files.add(1.0))
    with pytest.raises(FeedError, match=message) as caught:
        infer(server, feeds)
    assert isinstance(caught.value, InputError)
    server.client_error("main")  # what the front door does with a 4xx
    figures = server.telemetry.snapshot()["slots"]["main"]
    assert (figures["errors"], figures["client_errors"]) == (0, 1)  # never the model's


def test_cast_converts_lists_to_the_input_dtype(make_serving, model_files) -> None:
    server = make_serving()
    serve(server, 1, model_files.add(1.0))
    assert value_of(infer(server, {"x": X.tolist()}, cast=True)) == 1.0
    assert value_of(infer(server, {"x": X.astype(np.float64)}, cast=True)) == 1.0
    with pytest.raises(FeedError, match="cannot make a float32 array"):
        infer(server, {"x": [[1.0, 2.0], [3.0]]}, cast=True)
    with pytest.raises(FeedError, match="expected shape"):
        infer(server, {"x": [1, 2, 3, 4]}, cast=True)


def test_a_model_failing_at_run_time_raises_inference_error(make_serving, model_files) -> None:
    server = make_serving()
    serve(server, 1, model_files.gather(1.0))
    zeros = np.zeros((1, 4), np.float32)
    np.testing.assert_array_equal(infer(server, {"x": zeros})["y"], zeros + 1)
    with pytest.raises(InferenceError, match=r"m@1: inference failed: .*Gather"):
        infer(server, {"x": np.full((1, 4), 5.0, np.float32)})
    figures = server.telemetry.snapshot()["slots"]["main"]
    assert (figures["requests"], figures["errors"]) == (2, 1)


def test_a_free_dimension_model_serves_without_a_warm_up(make_serving, model_files) -> None:
    server = make_serving()
    serve(server, 1, model_files.mlp())
    assert infer(server, {"x": np.ones((3, 64), np.float32)})["y"].shape == (3, 10)


def test_a_session_option_onnxruntime_refuses_is_a_load_failure(make_serving, model_files) -> None:
    server = make_serving(threads=2**31)  # over onnxruntime's int range
    with pytest.raises(DeploymentError, match=r"slot main: m@1: load failed: ") as caught:
        serve(server, 1, model_files.add(1.0))
    assert caught.value.stage == "load" and server.current() is None


# -- activation -------------------------------------------------------------------------


def test_activate_swaps_after_a_passing_smoke_test(make_serving, model_files, recorder) -> None:
    server = make_serving()
    serve(server, 1, model_files.add(1.0))
    ok = serve(server, 2, model_files.add(2.0), smoke_for(2.0), max_latency_ms=10_000)
    assert current(server) == ref(2) and value_of(infer(server)) == 2.0
    assert recorder.types() == ["swap_started", "swap_ok"] * 2
    started, done = recorder.events[2:]
    assert started["deployment"] == loaded(2) and started["from"] == loaded(1)
    assert done is ok and done["from"] == loaded(1) and done["deployment"] == loaded(2)
    assert done["load_ms"] > 0 and done["smoke_ms"] > 0 and done["total_ms"] >= done["load_ms"]
    assert recorder.events[0]["from"] is None


def _refused(server, recorder, version: int, path, **kwargs) -> DeploymentError:  # type: ignore[no-untyped-def]
    before = len(recorder.events)
    with pytest.raises(DeploymentError) as caught:
        serve(server, version, path, **kwargs)
    assert current(server) == ref(1), "the old deployment must keep serving"
    assert value_of(infer(server)) == 1.0
    assert recorder.types()[before:] == ["swap_started", "swap_failed"]
    failed = recorder.events[-1]
    assert failed["model"] == ref(version).to_dict() and failed["slot"] == "main"
    assert (failed["stage"], failed["reason"]) == (caught.value.stage, caught.value.reason)
    return caught.value


def test_a_model_that_fails_to_load_leaves_the_old_one(make_serving, model_files, recorder) -> None:
    server = make_serving()
    serve(server, 1, model_files.add(1.0))
    error = _refused(server, recorder, 2, model_files.broken(), smoke=smoke_for(2.0))
    assert error.stage == "load" and "m@2: load failed" in str(error)


@pytest.mark.parametrize(
    ("value", "smoke", "message"),
    [
        (3.0, smoke_for(2.0), "output 'y' differs from the expected by up to 1"),
        (float("nan"), smoke_for(2.0), "contains NaN or Inf"),
        (2.0, SmokeTest(inputs={"input": X}, outputs={"y": X + 2}), "sample does not fit"),
        (2.0, SmokeTest(inputs={"x": X}, outputs={"z": X}), "has no output z"),
    ],
    ids=["wrong-output", "nan", "sample-does-not-fit", "missing-output"],
)
def test_a_failing_smoke_test_leaves_the_old_one(
    make_serving, model_files, recorder, value, smoke, message
) -> None:
    server = make_serving()
    serve(server, 1, model_files.add(1.0))
    error = _refused(server, recorder, 2, model_files.add(value), smoke=smoke)
    assert error.stage == "smoke_test" and message in error.reason


def test_the_smaller_latency_budget_applies(make_serving, model_files, recorder) -> None:
    server = make_serving()
    serve(server, 1, model_files.add(1.0))
    slow = model_files.slow(2.0, rows=128, width=256, depth=8)  # ~8M multiply-adds
    error = _refused(
        server, recorder, 2, slow, smoke=smoke_for(2.0, max_latency_ms=10_000), max_latency_ms=0.05
    )
    assert error.stage == "smoke_test" and "over the budget of 0.05 ms" in error.reason
    error = _refused(server, recorder, 2, slow, smoke=smoke_for(2.0, max_latency_ms=0.05))
    assert "over the budget of 0.05 ms" in error.reason


def test_a_failing_event_callback_does_not_break_a_swap(model_files) -> None:
    def explode(event: dict[str, Any]) -> None:
        raise RuntimeError("subscriber bug")

    with DeploymentServer(watch=NO_WATCH, on_event=explode) as server:
        serve(server, 1, model_files.add(1.0), smoke_for(1.0))
        assert current(server) == ref(1)


def test_an_unchanged_model_is_reused_not_loaded_again(make_serving, model_files) -> None:
    server = make_serving()
    det, rec1, rec2 = model_files.add(1.0), model_files.add(10.0), model_files.add(20.0)
    first = {"det": SlotSpec((ref(1, "det"),)), "rec": SlotSpec((ref(1, "rec"),))}
    sources = {
        ref(1, "det"): ModelSource(det),
        ref(1, "rec"): ModelSource(rec1),
        ref(2, "rec"): ModelSource(rec2),
    }
    server.activate(first, sources)
    det.unlink()  # det@1 stays loaded: the next deployment does not read its file
    second = {"det": first["det"], "rec": SlotSpec((ref(2, "rec"),))}
    server.activate(second, sources)
    assert value_of(server.predict("det", {"x": X}).outputs) == 1.0
    assert value_of(server.predict("rec", {"x": X}).outputs) == 20.0
    sources[ref(3, "rec")] = ModelSource(model_files.add(30.0))
    both = {"a": SlotSpec((ref(3, "rec"),)), "b": SlotSpec((ref(3, "rec"),))}
    server.activate(both, sources, watch=False)  # one model named by two slots loads once
    assert server.drained(timeout=30)
    gc.collect()
    assert len([o for o in gc.get_objects() if isinstance(o, ort.InferenceSession)]) == 1


# -- switching under load ----------------------------------------------------------------


@pytest.mark.parametrize(
    "watch",
    [NO_WATCH, WatchPolicy(window_s=60, min_requests=20, max_error_rate=1.0, max_p95_ratio=1e9)],
    ids=["no-watch", "watch-keeps-standby"],
)
def test_twenty_swaps_under_concurrent_requests_fail_no_request(
    make_serving, model_files, recorder, watch
) -> None:
    files = {v: model_files.add(float(v)) for v in range(1, 22)}
    server = make_serving(watch=watch)
    serve(server, 1, files[1])
    stop = threading.Event()
    seen: list[list[float]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def client(out: list[float]) -> None:
        while not stop.is_set():
            try:
                out.append(value_of(infer(server)))
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=client, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    try:
        for v in range(2, 22):
            time.sleep(0.01)
            serve(server, v, files[v], smoke_for(float(v)))
    finally:
        time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    assert current(server) == ref(21)
    assert recorder.types() == ["swap_started", "swap_ok"] * 21
    for out in seen:
        assert out, "every client must have been served"
        assert set(out) <= set(map(float, files))
        # Swaps only go forward, and a request sees the deployment current when it started.
        assert out == sorted(out)
    assert sum(len(out) for out in seen) == server.telemetry.snapshot()["slots"]["main"]["requests"]
    # Replaced sets were released (off the swap path): only the serving one (and the
    # standby) remain.
    assert server.drained(timeout=30)
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, ort.InferenceSession)]
    assert len(live) == (2 if watch.window_s else 1)


def test_no_request_sees_a_torn_pipeline_under_a_tiny_switch_interval(
    make_serving, model_files, pipeline_clients
) -> None:
    """Swaps of a two-slot deployment race requests with the GIL switching every 1 us."""
    versions = range(1, 7)
    sources = {}
    for v in versions:
        sources[ref(v, "det")] = ModelSource(model_files.add(float(v)))
        sources[ref(v, "rec")] = ModelSource(model_files.add(10.0 * v))

    def pipeline(v: int) -> dict[str, SlotSpec]:
        return {"det": SlotSpec((ref(v, "det"),)), "rec": SlotSpec((ref(v, "rec"),))}

    server = make_serving(watch=WatchPolicy(window_s=60, max_error_rate=1.0, max_p95_ratio=1e9))
    server.activate(pipeline(1), sources)
    with pipeline_clients(server) as clients:
        for v in [*versions[1:], 1, 3, 5]:
            server.activate(pipeline(v), sources)
            time.sleep(0.02)
    assert clients.failures == []
    assert len(clients.seen) >= 3


def test_a_swap_does_not_wait_for_the_old_set_to_drain(make_serving, model_files) -> None:
    server = make_serving(watch=NO_WATCH)
    serve(server, 1, model_files.slow(1.0, rows=1024, width=512, depth=24))  # ~0.5 s
    running = threading.Thread(target=infer, args=(server,))
    running.start()
    deadline = time.monotonic() + 10
    while not server._active.inflight and time.monotonic() < deadline:  # in flight on v1
        time.sleep(0.005)
    assert server._active.inflight == 1
    serve(server, 2, model_files.add(2.0), smoke_for(2.0))
    assert current(server) == ref(2)
    assert not server.drained(timeout=0)  # version 1 is still draining behind the swap
    running.join(timeout=30)
    assert server.drained(timeout=30)


@pytest.mark.parametrize("watch", [NO_WATCH, WatchPolicy(window_s=60)], ids=["drain", "standby"])
def test_an_in_flight_request_finishes_on_the_old_set(make_serving, model_files, watch) -> None:
    server = make_serving(watch=watch)
    serve(server, 1, model_files.slow(1.0, rows=1024, width=512, depth=24))  # ~0.5 s
    result: dict[str, Any] = {}

    def slow_request() -> None:
        result["start"] = time.time()
        result["outputs"] = infer(server)
        result["end"] = time.time()

    thread = threading.Thread(target=slow_request)
    thread.start()
    while "start" not in result:
        time.sleep(0.001)
    time.sleep(0.05)
    before = time.time()
    ok = serve(server, 2, model_files.add(2.0), smoke_for(2.0))
    assert value_of(infer(server)) == 2.0  # new requests go to the new deployment
    thread.join(timeout=60)
    assert result["start"] < before < result["end"], "the request must span the swap"
    assert result["end"] > ok["ts"]  # activate() did not wait for it
    assert value_of(result["outputs"]) == 1.0
    assert result["outputs"]["work"].shape == (1024, 512)


def test_close_releases_everything(make_serving, model_files) -> None:
    server = make_serving(watch=WatchPolicy(window_s=60))
    serve(server, 1, model_files.add(1.0))
    serve(server, 2, model_files.add(2.0))
    server.close()
    with pytest.raises(NoModelError):
        infer(server)
    with pytest.raises(SlimfleetError, match="closed"):
        serve(server, 3, model_files.add(3.0))
    assert server.telemetry.snapshot()["slots"] == {}
