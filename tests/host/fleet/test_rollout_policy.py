"""The rollout policy (pure) and its fleet.yaml defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimfleet.agent.errors import ConfigError
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.rollout_policy import (
    DeviceResult,
    RolloutSettings,
    decide,
    p95_regression,
    parse_waves,
    wave_plan,
)


@pytest.mark.parametrize(
    ("waves", "size", "plan"),
    [
        ("1,10,50,100%", 3, [1, 3]),
        ("1,10,50,100%", 200, [1, 10, 50, 200]),
        ("10%,50%,100%", 5, [1, 3, 5]),
        ("2", 5, [2]),
        ("50%,1,100%", 4, [2, 4]),  # a wave that adds nobody is dropped
    ],
)
def test_wave_plan(waves: str, size: int, plan: list[int]) -> None:
    assert wave_plan(waves, size) == plan


@pytest.mark.parametrize("waves", ["", "1,,2", "0", "150%", "x", "1.5", "-1", "nan%"])
def test_bad_waves(waves: str) -> None:
    with pytest.raises(ValueError, match="waves: "):
        parse_waves(waves)


def ok(device: str, before: float | None = None, after: float | None = None) -> DeviceResult:
    return DeviceResult(device, True, before, after)


def test_decide_on_failures_after_the_minimum_devices() -> None:
    settings = RolloutSettings(min_devices=3, max_failure_rate=0.3)
    failed = DeviceResult("d2", False)
    assert decide([ok("d1"), failed], settings).proceed  # too few devices to judge
    assert decide([ok("d1"), failed, ok("d3"), ok("d4")], settings).proceed  # 25 %
    decision = decide([ok("d1"), failed, ok("d3")], settings)
    assert not decision.proceed
    assert decision.reason == "1 of 3 devices failed (33% > 30%): d2"
    assert decide([], settings).proceed


def test_decide_on_p95_regression_against_the_previous_version() -> None:
    settings = RolloutSettings(max_p95_regression=0.2)
    fine = [ok("a", 10, 11), ok("b", 20, 23), ok("c", 10, None)]
    assert p95_regression(fine) == pytest.approx(17 / 15 - 1)
    assert decide(fine, settings).proceed
    slow = [ok("a", 10, 30), ok("b", 20, 40)]
    decision = decide(slow, settings)
    assert not decision.proceed and decision.reason == "p95 latency regressed +133% (limit +20%)"
    assert decide(slow, RolloutSettings(max_p95_regression=None)).proceed
    assert p95_regression([ok("a"), ok("b", 0, 3)]) is None


def test_sub_millisecond_p95s_are_compared_at_the_floor() -> None:
    noise = [ok("a", 0.05, 0.08), ok("b", 0.04, 0.07)]  # +60 %, all of it timer noise
    assert p95_regression(noise) == 0.0
    assert decide(noise, RolloutSettings(max_p95_regression=0.2)).proceed
    assert p95_regression([ok("a", 0.05, 3.0)]) == pytest.approx(2.0)  # floor 1 ms -> 3 ms


@pytest.mark.parametrize(
    "change",
    [
        {"min_devices": 0},
        {"max_failure_rate": 1.5},
        {"max_p95_regression": -1},
        {"soak_s": -1},
        {"timeout_s": 0},
        {"waves": "0"},
    ],
)
def test_settings_are_checked(change: dict) -> None:
    with pytest.raises(ValueError):
        RolloutSettings(**change)


@pytest.mark.parametrize(
    "change",
    [
        {"waves": "50%,10%"},  # dropped without a word before: the rollout ended at 50%
        {"waves": "1,1"},
        {"waves": "5,2,100%"},
        {"soak_s": 8.64e18},  # a typing slip, signed into the rollout record before
        {"timeout_s": 1e12},
        {"min_devices": 10**21},
    ],
)
def test_what_a_user_types_is_bounded_but_stored_records_still_load(change: dict) -> None:
    stored = RolloutSettings(**change)  # a record written before these bounds
    with pytest.raises(ValueError, match="waves: |at most"):
        stored.checked()
    assert RolloutSettings().checked() == RolloutSettings()


def test_fleet_yaml_rollout_defaults_per_group(fleet_yaml: Path, tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    extra = (
        "desired_ttl_s: 3600\n"
        "rollouts:\n"
        "  defaults: {waves: [1, 100%], soak_s: 5}\n"
        "  groups:\n"
        "    all: {max_failure_rate: 0.25, max_p95_regression: null}\n"
    )
    path.write_text(fleet_yaml.read_text() + extra)
    fleet = load_fleet(path)
    assert fleet.desired_ttl_s == 3600
    assert fleet.rollout_settings("canary") == RolloutSettings(waves="1,100%", soak_s=5)
    assert fleet.rollout_settings("all") == RolloutSettings(
        waves="1,100%", soak_s=5, max_failure_rate=0.25, max_p95_regression=None
    )
    assert load_fleet(fleet_yaml).desired_ttl_s == 7 * 24 * 3600


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("desired_ttl_s: 10\n", ":23: desired_ttl_s: must be >= 60"),
        ("rollouts:\n  groups:\n    nope: {}\n", ":25: rollouts.groups.nope: rollout settings"),
        ("rollouts:\n  defaults: {soak: 5}\n", ":24: rollouts.defaults.soak: unknown key"),
        ("rollouts:\n  defaults: {waves: 0%}\n", ":24: rollouts.defaults: waves: '0%'"),
        ("rollouts:\n  defaults: {waves: '50%,10%'}\n", ":24: rollouts.defaults: waves: 10% after"),
        ("rollouts:\n  defaults: {min_devices: 0}\n", ":24: rollouts.defaults.min_devices: must"),
    ],
)
def test_fleet_yaml_rollout_errors(fleet_yaml: Path, tmp_path: Path, extra: str, error: str):
    path = tmp_path / "fleet.yaml"
    path.write_text(fleet_yaml.read_text() + extra)
    with pytest.raises(ConfigError) as info:
        load_fleet(path)
    assert str(info.value).startswith(f"{path}{error}"), str(info.value)
