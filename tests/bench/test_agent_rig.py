"""The agent and fleet benches' pure parts: growth ratios, scaling verdicts, the swap
breakdown, the 10 MB model and the worker's wait (so a broken bench import fails CI)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import agent_bench
import fleet_bench
import fleet_sim
import numpy as np
import pytest
from agent_rig import breakdown, growth, growth_line, scaling

from slimfleet.agent.runtime import open_session


def test_growth_is_each_value_over_the_smallest_ns() -> None:
    assert growth({100: 8.0, 25: 2.0, 200: 16.0}) == {25: 1.0, 100: 4.0, 200: 8.0}
    assert growth({}) == {}
    assert math.isinf(growth({25: 0.0, 100: 1.0})[100])


def test_scaling_says_linear_until_per_device_cost_grows_over_a_quarter() -> None:
    assert scaling({25: 2.0, 100: 8.0, 200: 16.0}) == "linear or better"
    assert scaling({25: 2.0, 100: 3.0, 200: 5.0}) == "linear or better"
    assert scaling({25: 2.0, 200: 20.0}) == "linear or better"  # x1.25 per device
    assert scaling({25: 1.0, 100: 4.0, 200: 16.0}) == "superlinear (x2.00 per device)"
    assert scaling({25: 1.0}) == "one N only"


def test_growth_line_prints_values_and_ratios_against_the_smallest_n() -> None:
    line = growth_line("growth rollout", {200: 9.0, 25: 1.5, 100: 4.5}, " s")
    assert line == "growth rollout: N=25 1.50 s, N=100 4.50 s (x3.00), N=200 9.00 s (x6.00)"


def test_breakdown_gives_medians_and_shares_of_the_first_part() -> None:
    line = breakdown({"swap": [1.0, 0.2, 0.4], "load": [0.1, 0.3, 0.2], "none": []})
    assert line == "swap 400.00 ms, load 200.00 ms 50%"


def test_swap_parts_split_the_swap_without_the_download() -> None:
    update = {"total_s": 2.0, "download_s": 0.5, "install_s": 0.1, "load_s": 1.0}
    update["activate_s"] = 1.25
    clock = SimpleNamespace(smoke_s=0.2, events_s=0.01, prepare_s=0.65)
    parts = agent_bench.swap_parts(update, clock)
    assert parts["swap"] == pytest.approx(1.5)
    assert parts["manifest"] == pytest.approx(0.05)
    assert parts["switch"] == pytest.approx(0.05)
    assert parts["state"] == pytest.approx(0.1)
    inner = ("manifest", "install", "load", "warm-up run", "switch", "state")
    assert sum(parts[k] for k in inner) == pytest.approx(parts["swap"])


def test_the_fleet_model_is_ten_megabytes_and_runs(tmp_path: Path) -> None:
    out = fleet_bench.build_model(tmp_path / "m")
    assert 10e6 < (out / "model.onnx").stat().st_size < 10.5e6
    feeds = dict(np.load(out / "sample.npz"))
    (y,) = open_session(out / "model.onnx", 1).run(None, feeds)
    assert y.shape == (1, fleet_bench.WIDTH)


def test_the_worker_waits_for_each_devices_own_seq() -> None:
    agents = {
        "a": SimpleNamespace(last_update={"seq": 3}),
        "b": SimpleNamespace(last_update={"seq": 1}),
        "c": SimpleNamespace(last_update=None),
    }
    assert fleet_sim._watch(agents, {"a": 3, "z": 9}, 1.0)[0] == "served"  # z: another worker's
    assert fleet_sim._watch(agents, {"a": 3, "b": 2, "c": 1}, 0.05) == ("late", ["b", "c"])


def test_the_report_prints_growth_and_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    figures = {
        "rollout_s": 2.0,
        "bytes_ratio": 1.1,
        "status_rate": 25.0,
        "exporter_rate": 25.0,
        "status_cpu": 0.02,
        "exporter_cpu": 0.03,
        "serving_mb": 30.0,
    }
    bigger = {**figures, "rollout_s": 20.0, "status_rate": 200.0, "exporter_rate": 199.0}
    fleet_bench.report({25: figures, 200: bigger})
    out = capsys.readouterr().out.splitlines()
    assert "growth rollout time: N=25 2.00 s, N=200 20.00 s (x10.00)" in out
    assert "growth exporter CPU % of a core: N=25 3.00 %, N=200 3.00 % (x1.00)" in out
    assert out[-3].startswith("rollout time against N: linear or better")
    assert out[-2].startswith("broker bytes against N: linear or better")
    assert out[-1].startswith("exporter at N=200, 1 s telemetry: 199 msg/s of 200/s at 3.0%")
