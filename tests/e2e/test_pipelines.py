"""Issue 7 against a REAL agent, real mosquitto and the real CLI: a two-slot pipeline
switches as one set under HTTP traffic, a broken second model keeps the old set, a chain
tier that does not load is skipped, a remote tier answers escalations within its timeout,
tritonclient drives the agent, and bad input gets one line."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
from pathlib import Path

import models
import numpy as np
import pytest
from e2e_rig import OipServer, X, infer_json, serving

from slimfleet.agent.remote import FAILURES_TO_OPEN

DET, REC = 1.0, 10.0  # det@v adds DET * v, rec@v adds REC * v


def publish_pipeline(e2e, version: int) -> None:
    e2e.publish(models.add_const(DET * version), "det", version)
    e2e.publish(models.add_const(REC * version), "rec", version)


def assign_pipeline(e2e, version: int, timeout: str = "20s"):
    return e2e.cli(
        "assign", "--slot", f"det=det@{version}", "--slot", f"rec=rec@{version}",
        "--device", "d1", "--timeout", timeout,
    )  # fmt: skip


def write_deployment(tmp: Path, text: str) -> Path:
    path = tmp / "deployment.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def pipeline(e2e):
    """d1 serving det@1 + rec@1, det@2 + rec@2 published."""
    publish_pipeline(e2e, 1)
    publish_pipeline(e2e, 2)
    e2e.agent("d1")
    run = assign_pipeline(e2e, 1)
    assert run.code == 0, run
    return e2e


def test_a_pipeline_switches_as_one_set_under_http_traffic(pipeline) -> None:
    agent = pipeline.agents["d1"]
    seen: list[tuple[str, str, float]] = []  # (slot, model header, added value), in order
    done = threading.Event()

    def client() -> None:  # a pipeline client: det then rec, again and again
        while not done.is_set():
            for slot in ("det", "rec"):
                doc, headers = infer_json(agent, slot, X)
                assert doc["parameters"]["slimfleet_model"] == headers["X-Slimfleet-Model"]
                seen.append((slot, headers["X-Slimfleet-Model"], doc["outputs"][0]["data"][0]))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        run = assign_pipeline(pipeline, 2)
        time.sleep(0.3)
    finally:
        done.set()
        thread.join(timeout=10)
    assert run.code == 0 and run.out.startswith("d1: serving"), run
    versions = [int(model.split("@")[1]) for _, model, _ in seen]
    assert versions[0] == 1 and versions[-1] == 2, versions
    # one switch for both slots: once any request saw v2, none saw v1 again
    assert versions == sorted(versions), seen
    for slot, model, added in seen:  # and each answer came from the model it names
        version = int(model.split("@")[1])
        assert added == (DET if slot == "det" else REC) * version, (slot, model, added)


def test_a_request_to_an_unknown_slot_is_a_404_with_one_line(pipeline) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        infer_json(pipeline.agents["d1"], "cls", X)
    assert refused.value.code == 404
    assert json.loads(refused.value.read()) == {
        "error": "no slot 'cls' in the deployment serving now"
    }


def test_a_broken_second_model_keeps_the_whole_old_set(pipeline) -> None:
    e2e = pipeline
    e2e.publish(models.add_const(3.0), "det", 3)
    e2e.publish_unloadable("rec", 3)
    events = e2e.events("d1")
    run = assign_pipeline(e2e, 3)
    assert run.code == 1, run
    assert run.out.startswith("d1: refused at load:") and "rec@3" in run.out, run.out
    assert "d1 refused" in run.err
    refused = events.wait("swap_failed", model={"name": "rec", "version": 3})
    assert refused["stage"] == "load" and refused["slot"] == "rec"
    agent = e2e.agents["d1"]
    assert serving(agent) == {"det": ["det@1"], "rec": ["rec@1"]}
    for slot, added in (("det", DET), ("rec", REC)):
        doc, headers = infer_json(agent, slot, X)
        assert headers["X-Slimfleet-Model"] == f"{slot}@1"
        assert doc["outputs"][0]["data"] == [added] * 4


def test_a_chain_tier_that_fails_to_load_is_skipped_with_an_event(e2e, tmp_path) -> None:
    e2e.publish_unloadable("ocr", 9)
    e2e.publish(models.add_const(4.0), "ocr", 4)
    agent = e2e.agent("d1")
    events = e2e.events("d1")
    file = write_deployment(tmp_path, "slots:\n  main:\n    models: [ocr@9, ocr@4]\n")
    run = e2e.cli("assign", "--deployment", file, "--device", "d1", "--timeout", "20s")
    assert run.code == 0 and run.out.startswith("d1: serving"), run
    skipped = events.wait("tier_skipped", slot="main")
    assert skipped["model"] == {"name": "ocr", "version": 9}
    doc, headers = infer_json(agent, "main", X)
    assert headers["X-Slimfleet-Tier"] == "ocr@4" and doc["outputs"][0]["data"] == [4.0] * 4


def test_a_remote_tier_answers_escalations_and_its_timeout_is_honoured(e2e, tmp_path) -> None:
    remote = OipServer()
    e2e._closers.append(remote.close)
    e2e.publish(models.add_const(1.0), "ocr", 7)
    agent = e2e.agent("d1")
    events = e2e.events("d1")
    file = write_deployment(
        tmp_path,
        "slots:\n  main:\n    models: [ocr@7]\n"
        "    gate: {function: max_prob, threshold: 0.9}\n"  # four equal scores: 0.25, unsure
        f"    remote: {{url: '{remote.url}', timeout_s: 0.5}}\n",
    )
    run = e2e.cli("assign", "--deployment", file, "--device", "d1", "--timeout", "20s")
    assert run.code == 0, run

    doc, headers = infer_json(agent, "main", X)
    assert headers["X-Slimfleet-Tier"] == "remote" and "X-Slimfleet-Model" not in headers
    assert doc["parameters"]["slimfleet_tier"] == "remote"
    assert doc["outputs"][0]["data"] == [100.0] * 4 and remote.calls == 1

    remote.delay_s = 3.0  # now far slower than the slot's timeout
    for _ in range(FAILURES_TO_OPEN):
        started = time.monotonic()
        doc, headers = infer_json(agent, "main", X)
        assert time.monotonic() - started < 2.0  # the 0.5 s timeout was honoured
        # the best local answer instead, and it says so
        assert headers["X-Slimfleet-Tier"] == "ocr@7" and doc["outputs"][0]["data"] == [1.0] * 4
    failing = events.wait("tier_failing", slot="main")  # the breaker opened
    assert failing["reason"].startswith(f"{remote.url}: remote: no answer within 0.5 s"), failing
    calls = remote.calls
    started = time.monotonic()
    doc, headers = infer_json(agent, "main", X)
    assert time.monotonic() - started < 0.4 and remote.calls == calls  # not asked while open
    assert headers["X-Slimfleet-Tier"] == "ocr@7"


def test_tritonclient_infers_with_binary_data_on_a_two_slot_deployment(pipeline) -> None:
    import tritonclient.http as triton

    agent = pipeline.agents["d1"]
    client = triton.InferenceServerClient(agent.http_url.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.is_model_ready("rec")
        meta = client.get_model_metadata("rec")
        assert meta["versions"] == ["1"] and meta["inputs"][0]["name"] == "x"
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        for slot, added in (("det", DET), ("rec", REC)):
            feed = triton.InferInput("x", [1, 4], "FP32")
            feed.set_data_from_numpy(x, binary_data=True)
            wanted = triton.InferRequestedOutput("y", binary_data=True)
            result = client.infer(slot, [feed], outputs=[wanted])
            np.testing.assert_array_equal(result.as_numpy("y"), x + added)
            assert result.get_response()["parameters"]["slimfleet_model"] == f"{slot}@1"
    finally:
        client.close()
