"""``slimfleet assign | unassign | reissue | prune`` as a user runs them (in-process, through
the real entry point): per-device outcome lines, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import models
import pytest
from brokers import Mosquitto, free_port
from devicesim import DeviceSimulator

from slimfleet.agent.deployment import SLOT_MAIN
from slimfleet.agent.wire import ModelRef
from slimfleet.host.cli import main
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet import rollout as rollouts
from slimfleet.host.fleet.config import BROKER_ENV, FleetConfig, load_fleet
from slimfleet.host.fleet.deploy_cli import reissue_loop
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import publish_model
from slimfleet.host.fleet.rollout_cli import device_line


@dataclass
class Run:
    code: int
    out: str
    err: str

    def one_line_error(self) -> str:
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), self.err
        return lines[0]


@pytest.fixture
def fleet_file(fleet_yaml: Path, tmp_path: Path, prefix: str, mosquitto: Mosquitto) -> Path:
    """The repository's fleet.yaml with this test's prefix and fresh keys beside it."""
    path = tmp_path / "fleet.yaml"
    text = fleet_yaml.read_text().replace("prefix: slimfleet/demo", f"prefix: {prefix}")
    path.write_text(text + "desired_ttl_s: 3600\n")
    fleet = load_fleet(path)
    generate_keys(fleet.private_key, fleet.public_key)
    return path


@pytest.fixture
def cli_fleet(fleet_file: Path, mosquitto: Mosquitto, tmp_path: Path) -> FleetConfig:
    """The fleet of ``fleet_file`` on the test broker, with a@1, a@2 and b@1 published."""
    fleet = load_fleet(fleet_file, broker_url=mosquitto.url)
    for i, (name, version) in enumerate([("a", 1), ("a", 2), ("b", 1)]):
        model = models.save(models.add_const(float(i)), tmp_path / f"{name}{version}.onnx")
        publish_model(fleet, model, name, version)
    return fleet


@pytest.fixture
def slimfleet(fleet_file: Path, mosquitto: Mosquitto, monkeypatch, capsys):
    """``slimfleet(*args, broker=url)`` -> Run, through the real ``main`` in this process."""

    def run(*args: str | Path, broker: str | None = mosquitto.url) -> Run:
        monkeypatch.setenv(BROKER_ENV, broker)
        monkeypatch.setattr(sys, "argv", ["slimfleet", *map(str, args), "--fleet", str(fleet_file)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return Run(exit_info.value.code, out, err)

    return run


def test_assign_waits_and_reports_each_device(cli_fleet: FleetConfig, slimfleet) -> None:
    def decide(device, desired):
        if ModelRef("a", 2) in desired.refs():
            return "refused", "load", "onnxruntime failed to load the model"
        return "serving", None, None

    with DeviceSimulator(cli_fleet, ["cam-01", "cam-02"], decide):
        run = slimfleet("assign", "a@1", "--group", "all", "--timeout", "1s")
        assert run.code == 1, run.err
        assert run.out.splitlines() == [
            "cam-01: serving  [seq 1: main=a@1]",
            "cam-02: serving  [seq 1: main=a@1]",
            "gate-01: no answer  [seq 1: main=a@1]",
        ]
        assert run.one_line_error() == (
            "error: 1 of 3 device(s) do not serve what they were sent: gate-01 no answer"
        )
        run = slimfleet("assign", "--slot", "det=b@1", "--device", "cam-01", "--json")
        assert run.code == 0, run.err
        doc = json.loads(run.out)
        assert doc["ok"] is True
        assert doc["devices"] == [
            {
                "device": "cam-01",
                "seq": 2,
                "outcome": "serving",
                "stage": None,
                "reason": None,
                "deployment": {"det": ["b@1"], SLOT_MAIN: ["a@1"]},
            }
        ]
        run = slimfleet("assign", "a@2", "--device", "cam-02")
        assert (run.code, run.out.strip()) == (
            1,
            "cam-02: refused at load: onnxruntime failed to load the model  [seq 2: main=a@2]",
        )
        run = slimfleet("assign", "a@2", "--device", "gate-01", "--no-wait")
        assert (run.code, run.out.strip()) == (0, "gate-01: sent  [seq 2: main=a@2]")


def test_assign_a_deployment_file(cli_fleet: FleetConfig, slimfleet, tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(
        "slots:\n  rec:\n    models: [a@2, a@1]\n"
        "    gate: {function: max_prob, threshold: 0.7}\n"
        "    remote: {url: 'https://x.example/infer'}\n"
    )
    with DeviceSimulator(cli_fleet, ["cam-01"]):
        run = slimfleet("assign", "--deployment", path, "--device", "cam-01")
    assert (run.code, run.out.strip()) == (0, "cam-01: serving  [seq 1: rec=a@2,a@1]")
    with deploy.connect(cli_fleet) as link:
        desired = deploy.read_current(link, cli_fleet, ["cam-01"])["cam-01"].desired
    assert desired.deployment["rec"].remote.url == "https://x.example/infer"
    assert desired.expires - desired.issued == pytest.approx(3600)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--slot", "det:b@1"], "--slot 'det:b@1': expected SLOT=NAME@VERSION"),
        (["--slot", "Det=b@1"], "--slot 'Det=b@1': invalid slot name 'Det'"),
        (["--slot", "det=b"], "--slot 'det=b': expected name@version, got 'b'"),
        (["a@1", "--slot", "det=b@9"], "b@9 is not published on mqtt://"),
        (["a@1", "--slot", "main=a@2"], "--slot 'main=a@2': slot 'main' is already set"),
        (["nothing@1"], "nothing@1 is not published"),
        (["a@1", "--timeout", "soon"], "--timeout 'soon': expected a duration"),
        ([], "nothing to assign"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    cli_fleet: FleetConfig, slimfleet, args: list[str], error: str
) -> None:
    run = slimfleet("assign", *args, "--device", "cam-01")
    assert run.code == 2, run.err
    assert run.one_line_error().startswith(f"error: {error}"), run.err


def test_bad_deployment_file_and_unknown_group(slimfleet, tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("slots:\n  rec:\n    models: [a@1]\n    remote: {url: ftp://x}\n")
    run = slimfleet("assign", "--deployment", path, "--device", "cam-01")
    assert run.code == 2
    assert run.one_line_error() == (
        f"error: {path}:4: slots.rec.remote.url: expected an http(s) URL "
        "(http(s)://host[:port]/path), got 'ftp://x'"
    )
    run = slimfleet("unassign", "--group", "nope")
    assert run.code == 2 and "unknown group 'nope'" in run.one_line_error()


def test_unreachable_broker_is_one_line_and_exit_1(slimfleet) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    for args in (
        ["assign", "a@1", "--group", "all"],
        ["unassign", "--device", "cam-01"],
        ["reissue"],
        ["prune", "a@1"],
    ):
        run = slimfleet(*args, broker=url)
        assert run.code == 1, (args, run.err)
        assert run.one_line_error().startswith(f"error: cannot reach the MQTT broker at {url}")


def test_unassign_reissue_and_prune(cli_fleet: FleetConfig, slimfleet) -> None:
    with DeviceSimulator(cli_fleet, ["cam-01", "cam-02"]):
        assert slimfleet("assign", "a@1", "--device", "cam-01", "--device", "cam-02").code == 0
        assert slimfleet("assign", "a@2", "--device", "cam-01").code == 0
        run = slimfleet("unassign", "--device", "cam-01", "--previous")
        assert (run.code, run.out.strip()) == (0, "cam-01: serving  [seq 3: main=a@1]")
        run = slimfleet("unassign", "--device", "cam-02")
        assert (run.code, run.out.strip()) == (0, "cam-02: serving  [seq 2: nothing]")

        run = slimfleet("reissue", "--every", "0.2s", "--rounds", "2", "--timeout", "5s")
        assert run.code == 0, run.err
        assert run.out.splitlines() == [
            "round 1: re-signed 2 desired state(s): cam-01@seq4, cam-02@seq3; 2 of 2 serving",
            "round 2: re-signed 2 desired state(s): cam-01@seq5, cam-02@seq4; 2 of 2 serving",
        ]
        run = slimfleet("reissue", "--every", "2h")
        assert run.code == 2 and "not shorter than desired_ttl_s (3600s)" in run.err

        run = slimfleet("prune", "a@1")
        assert run.code == 2
        assert run.one_line_error().startswith("error: a@1 is still used by cam-01")
        run = slimfleet("prune", "a@2", "--json")
        assert run.code == 0 and json.loads(run.out)["cleared"] >= 2


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["rollout", "a@2"], "name the group with --group"),
        (["rollout", "a@2", "--group", "nope"], "unknown group 'nope'"),
        (["rollout", "a@2", "--group", "all", "--waves", "0,5"], "waves: '0' must be a count"),
        (["rollout", "a@2", "--group", "all", "--min-devices", "x"], "--min-devices: expected an"),
        (["rollout", "a@2", "--group", "all", "--max-failure-rate", "2"], "max_failure_rate must"),
        (
            ["rollout", "a@2", "--group", "all", "--soak", "1 week"],
            "--soak '1 week': expected a duration",
        ),
        (["rollout", "a@2", "--group", "all", "--slot", "A"], "--slot: invalid slot name 'A'"),
        (["rollout", "a@9", "--group", "all"], "a@9 is not published"),
        (["rollout", "resume", "--group", "all"], "no rollout is running on group 'all'"),
        (["rollout", "abort", "--group", "canary"], "no rollout is running on group 'canary'"),
        (["rollout", "status", "--group", "all"], "no rollout was started on group 'all'"),
    ],
)
def test_rollout_bad_input_is_one_line_and_exit_2(
    cli_fleet: FleetConfig, slimfleet, args: list[str], error: str
) -> None:
    run = slimfleet(*args)
    assert run.code == 2, run.err
    assert run.one_line_error().startswith(f"error: {error}"), run.err


def test_rollout_through_the_cli(cli_fleet: FleetConfig, slimfleet) -> None:
    fast = ["--soak", "0.3s", "--timeout", "5s"]

    def decide(device, desired):
        if ModelRef("b", 1) in desired.refs():
            return "refused", "verify", "bad signature"
        return "serving", None, None

    with DeviceSimulator(cli_fleet, cli_fleet.groups["all"], decide):
        assert slimfleet("assign", "a@1", "--group", "all").code == 0
        run = slimfleet("rollout", "a@2", "--group", "all", "--waves", "2,100%", *fast)
        assert run.code == 0, run.err
        assert (
            run.out.splitlines()[0]
            == "rollout of a@2 on all (slot main): waves of [2, 3] device(s)"
        )
        assert run.out.splitlines()[-1] == "rollout of a@2 on all: done"
        status = slimfleet("rollout", "status", "--group", "all", "--json")
        assert json.loads(status.out)["state"] == "done"

        run = slimfleet("rollout", "b@1", "--group", "all", "--slot", "det", *fast)
        assert run.code == 1
        assert run.one_line_error() == "error: the rollout of b@1 on all was aborted"
        status = slimfleet("rollout", "status", "--group", "all")
        assert status.out.splitlines() == [
            "rollout of b@1 on all (slot det): aborted (1 of 1 devices failed (100% > 0%): "
            "cam-01), 0 of 2 wave(s) passed",
            "  cam-01: wave 1, seq 3, refused",
        ]


def test_reissue_loop_reports_a_failed_round_and_goes_on(
    cli_fleet: FleetConfig, slimfleet, capsys
) -> None:
    down = cli_fleet.with_broker_url(f"mqtt://127.0.0.1:{free_port()}")
    reissue_loop(down, ["cam-01"], 0.1, 2, wait=True, timeout_s=1.0)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["round 1", "round 2"]
    assert "error: cannot reach the MQTT broker" in err[0]

    with DeviceSimulator(cli_fleet, ["cam-01"]):
        assert slimfleet("assign", "a@1", "--device", "cam-01").code == 0
        run = slimfleet("reissue", "--device", "cam-01", "--every", "1s", "--rounds", "1", "--json")
    assert json.loads(run.out) == {
        "round": 1,
        "devices": [
            {"device": "cam-01", "seq": 2, "outcome": "serving", "stage": None, "reason": None}
        ],
    }


def test_rollout_status_says_a_device_was_never_heard_from_once_the_rollout_ended() -> None:
    # an operator's abort mid-wave left touched devices without outcome: "waiting" misled
    touched = rollouts.Touched(previous={}, wave=0, seq=4)
    assert device_line("cam-01", touched, rollouts.RUNNING) == "cam-01: wave 1, seq 4, waiting"
    assert (
        device_line("cam-01", touched, rollouts.ABORTED)
        == "cam-01: wave 1, seq 4, no outcome (aborted)"
    )
    served = rollouts.Touched({}, 1, 5, result="serving", p95_before=3.0, p95_after=3.2)
    assert device_line("cam-02", served, rollouts.DONE) == (
        "cam-02: wave 2, seq 5, serving, p95 3.0 -> 3.2 ms"
    )
