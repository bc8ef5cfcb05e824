"""Issue 9 against REAL agents and real mosquitto: assign outcomes, status, events, the
exporter over HTTP, unassign --previous, prune, and one-line errors for bad input."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import models
import pytest
from brokers import free_port
from e2e_rig import Traffic, serving, wait_until

SMOKE_FAILS = {"max_latency_ms": 0.000001}  # the publisher's latency budget: no device meets it


@pytest.fixture
def published(e2e):
    """m@1 (+1), m@2 (+2), m@3 whose smoke test fails on every device."""
    e2e.publish(models.add_const(1.0), "m", 1)
    e2e.publish(models.add_const(2.0), "m", 2)
    e2e.publish(models.add_const(3.0), "m", 3, **SMOKE_FAILS)
    return e2e


def test_assign_waits_for_real_agents_and_prints_each_outcome(published) -> None:
    e2e = published
    e2e.agent("d1")
    e2e.agent("d2")
    e2e.agent("d3").stop()  # enrolled (its store exists), then offline

    ok = e2e.cli("assign", "m@1", "--device", "d1", "--device", "d2", "--timeout", "20s")
    assert ok.code == 0, ok
    assert sorted(ok.out.splitlines()) == [
        "d1: serving  [seq 1: main=m@1]",
        "d2: serving  [seq 1: main=m@1]",
    ]

    refused = e2e.cli("assign", "m@3", "--device", "d1", "--timeout", "20s")
    assert refused.code == 1, refused
    assert refused.out.startswith("d1: refused at smoke_test: slot main: m@3")
    assert "over the budget" in refused.out
    assert serving(e2e.agents["d1"]) == {"main": ["m@1"]}  # the old set kept serving

    offline = e2e.cli("assign", "m@1", "--device", "d3", "--timeout", "1s")
    assert (offline.code, offline.out.strip()) == (1, "d3: no answer  [seq 1: main=m@1]")
    assert "d3 no answer" in offline.err

    started = time.monotonic()
    sent = e2e.cli("assign", "m@2", "--group", "trio", "--no-wait", "--json")
    assert sent.code == 0 and time.monotonic() - started < 5
    assert {o["device"]: o["outcome"] for o in sent.json()["devices"]} == dict.fromkeys(
        ("d1", "d2", "d3"), "sent"
    )
    wait_until(lambda: serving(e2e.agents["d2"]) == {"main": ["m@2"]}, what="d2 on m@2")

    e2e.agent("d3")  # back online: it picks up its retained desired state (seq 2)
    wait_until(lambda: serving(e2e.agents["d3"]) == {"main": ["m@2"]}, what="d3 on m@2")


def test_status_events_and_the_exporter_show_real_agents(published) -> None:
    e2e = published
    for device in ("d1", "d2"):
        e2e.agent(device)
    assert e2e.cli("assign", "m@1", "--group", "trio", "--no-wait").code == 0
    for device in ("d1", "d2"):
        wait_until(lambda d=device: serving(e2e.agents[d]) == {"main": ["m@1"]}, what=device)
    traffic = Traffic(e2e.agents["d1"])  # real requests through the OIP HTTP API
    try:
        status = e2e.cli("status", "--json", "--wait", "1.5s")
    finally:
        traffic.stop()
    assert traffic.answers and traffic.answers[-1] == [1.0] * 4
    assert status.code == 0, status
    rows = {row["device"]: row for row in status.json()["devices"]}
    d1 = rows["d1"]
    assert (d1["online"], d1["deployment"], d1["last_good"]) == (
        True,
        {"main": ["m@1"]},
        {"main": ["m@1"]},
    )
    assert d1["desired"]["outcome"] == "serving" and d1["desired"]["seq"] == 1
    assert 0 < d1["slots"]["main"]["p50_ms"] <= d1["slots"]["main"]["p95_ms"] < 1000
    assert d1["rss_bytes"] > 10 * 2**20
    assert rows["d3"]["online"] is None and rows["d3"]["deployment"] is None  # never seen

    published_models = {(m["name"], m["version"]): m for m in e2e.cli("models", "--json").json()}
    assert published_models[("m", 1)]["devices"] == ["d1/main", "d2/main"]
    assert published_models[("m", 2)]["devices"] == []

    # events --device d1 in another process sees d1's swap to m@2, and nothing of d2's
    follower = e2e.spawn("events", "--device", "d1", "--follow", "--json", connected=True)
    try:
        time.sleep(0.5)  # it subscribes (events are not retained)
        assert e2e.cli("assign", "m@2", "--group", "one", "--timeout", "20s").code == 0
        assert e2e.cli("assign", "m@2", "--device", "d2", "--timeout", "20s").code == 0
        time.sleep(1.0)
    finally:
        follower.terminate()
        out, err = follower.communicate(timeout=10)
    assert len(err) < 8000, err[-2000:]  # -vv debug lines: far from filling the pipe
    events = [json.loads(line) for line in out.splitlines()]
    assert events and {e["device"] for e in events} == {"d1"}, (out, err)
    swaps = [e for e in events if e["type"] == "swap_ok"]
    assert swaps and swaps[-1]["deployment"]["main"][0] == {"name": "m", "version": 2}

    port = free_port()
    exporter = e2e.spawn("exporter", "--port", str(port), "--host", "127.0.0.1")
    try:

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return ""
            return text if 'slimfleet_slot_requests_total{device="d1"' in text else ""

        text = wait_until(scrape, timeout=20, what="the exporter's metrics of d1")
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
    assert 'slimfleet_device_up{device="d1"} 1.0' in text
    assert 'slimfleet_device_up{device="d2"} 1.0' in text
    assert 'slimfleet_device_resident_memory_bytes{device="d1"}' in text
    assert "slimfleet_slot_model_info{" in text and 'version="2"' in text


def test_unassign_previous_then_prune_refuses_a_version_in_use(published) -> None:
    e2e = published
    agent = e2e.agent("d1")
    for version in (1, 2):
        run = e2e.cli("assign", f"m@{version}", "--device", "d1", "--timeout", "20s")
        assert run.code == 0, run
    back = e2e.cli("unassign", "--previous", "--device", "d1", "--timeout", "20s")
    assert back.code == 0, back
    assert serving(agent) == {"main": ["m@1"]}
    assert back.out.startswith("d1: serving")

    refused = e2e.cli("prune", "m@1")
    assert refused.code != 0
    assert "d1" in refused.one_line_error()
    pruned = e2e.cli("prune", "m@3")  # refused by every device: nobody runs it
    assert pruned.code == 0, pruned
    gone = e2e.cli("assign", "m@3", "--device", "d1", "--timeout", "5s")
    assert gone.code == 2 and "m@3" in gone.one_line_error()

    empty = e2e.cli("unassign", "--device", "d1", "--timeout", "20s")
    assert empty.code == 0, empty
    assert serving(agent) == {}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("assign", "m@1", "--group", "nosuch"), "nosuch"),
        (("assign", "m@9", "--device", "d1"), "m@9"),
        (("assign", "--slot", "no slot", "--device", "d1"), "no slot"),
        (("rollout", "m@2", "--group", "trio", "--waves", "1,abc"), "abc"),
        (("rollout", "m@2", "--group", "trio", "--max-failure-rate", "2"), "failure"),
        (("rollout", "m@2", "--group", "trio", "--soak", "soon"), "soon"),
        (("rollout", "resume", "--group", "trio"), "trio"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(published, args, words) -> None:
    run = published.cli(*args)
    assert run.code == 2, run
    assert words in run.one_line_error()


@pytest.mark.parametrize(
    "args",
    [
        ("status", "--wait", "1s"),
        ("assign", "m@1", "--device", "d1"),
        ("rollout", "m@1", "--group", "trio"),
        ("rollout", "status", "--group", "trio"),
    ],
)
def test_an_unreachable_broker_is_one_line(published, args) -> None:
    run = published.cli(*args, broker=f"mqtt://127.0.0.1:{free_port()}")
    assert run.code == 1, run  # the operation failed; the input was fine
    assert "127.0.0.1" in run.one_line_error()


def status_row(e2e, device: str, wait: str = "0.5s") -> dict:
    status = e2e.cli("status", "--json", "--wait", wait)
    assert status.code == 0, status
    return next(r for r in status.json()["devices"] if r["device"] == device)


def test_a_killed_agent_process_is_no_answer_then_serves_when_it_returns(published) -> None:
    e2e = published
    agent = e2e.agent_process("d1")  # the real slimfleet-agent command
    wait_until(lambda: status_row(e2e, "d1")["online"], what="d1 online")
    first = e2e.cli("assign", "m@1", "--device", "d1", "--timeout", "30s")
    assert first.code == 0 and first.out.startswith("d1: serving"), first
    agent.send_signal(signal.SIGKILL)  # no clean shutdown: the Last Will says offline
    agent.wait(timeout=10)
    gone = e2e.cli("assign", "m@2", "--device", "d1", "--timeout", "2s")
    assert (gone.code, gone.out.strip()) == (1, "d1: no answer  [seq 2: main=m@2]")

    e2e.agent_process("d1")  # back: it follows its retained desired state
    wanted = {"seq": 2, "outcome": "serving", "deployment": {"main": ["m@2"]}}
    row = wait_until(
        lambda: wanted.items() <= ((row := status_row(e2e, "d1"))["desired"] or {}).items() and row,
        what="d1 serving seq 2",
    )
    assert row["online"] and row["deployment"] == {"main": ["m@2"]}


def test_an_assign_sent_while_the_agent_boots_is_followed(published) -> None:
    e2e = published
    e2e.agent_process("d1")  # its store is created a second or two from now
    run = e2e.cli("assign", "m@1", "--device", "d1", "--timeout", "30s")
    assert run.code == 0 and run.out.startswith("d1: serving"), run
