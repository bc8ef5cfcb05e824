"""The fleet commands as a user runs them: exit codes, one-line errors, --json output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import models
import pytest
from brokers import Mosquitto, free_port, wait_port

from slimfleet.host.fleet.config import BROKER_ENV, load_fleet
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.publish import publish_model

RUN = "from slimfleet.host.cli import main; main()"


def slimfleet(*args: str | Path, broker: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != BROKER_ENV}
    if broker:
        env[BROKER_ENV] = broker
    return subprocess.run(
        [sys.executable, "-c", RUN, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def fleet_file(fleet_yaml: Path, tmp_path: Path, prefix: str) -> Path:
    """The repository's fleet.yaml with this test's prefix, next to a fresh keys/ dir."""
    path = tmp_path / "fleet.yaml"
    path.write_text(fleet_yaml.read_text().replace("prefix: slimfleet/demo", f"prefix: {prefix}"))
    fleet = load_fleet(path)
    generate_keys(fleet.private_key, fleet.public_key)
    return path


def test_keys_generate(tmp_path: Path, fleet_yaml: Path) -> None:
    result = slimfleet("keys", "generate", "--out", tmp_path / "k", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert Path(doc["private_key"]) == tmp_path / "k" / "signing.key"
    assert (tmp_path / "k" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k" / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY")
    assert len(doc["key_id"]) == 16

    again = slimfleet("keys", "generate", "--out", tmp_path / "k")
    assert again.returncode == 2
    assert "already exists; refusing to overwrite" in one_line_error(again)

    # without --out the key goes where the fleet file says (keys/ next to it)
    (tmp_path / "fleet.yaml").write_text(fleet_yaml.read_text())
    result = slimfleet("keys", "generate", "--fleet", tmp_path / "fleet.yaml")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600


def test_publish(fleet_file: Path, outdir: Path, tmp_path: Path, mosquitto: Mosquitto) -> None:
    url = mosquitto.url
    first = slimfleet(
        "publish",
        outdir,
        "--name",
        "net",
        "--version",
        "1",
        "--fleet",
        fleet_file,
        "--chunk-size",
        "4096",
        "--json",
        broker=url,
    )
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["published"] is True and doc["chunks"] > 1 and doc["chunk_size"] == 4096

    again = slimfleet(
        "publish", outdir, "--name", "net", "--version", "1", "--fleet", fleet_file, broker=url
    )
    assert again.returncode == 0, again.stderr
    assert "already published with the same bytes: nothing to do" in again.stdout

    other = models.save(models.add_one(), tmp_path / "other.onnx")
    refused = slimfleet(
        "publish", other, "--name", "net", "--version", "1", "--fleet", fleet_file, broker=url
    )
    assert refused.returncode == 2
    assert one_line_error(refused) == (
        "error: version 1 of net is already published with different content; "
        "versions are immutable"
    )
    shown = slimfleet(
        "publish",
        outdir,
        "--name",
        "net",
        "--version",
        "2",
        "--fleet",
        fleet_file,
        "--chunk-size",
        "4096",
        broker=url,
    )  # off a terminal: a line per tenth of the chunks, not a bar's stray label
    assert shown.returncode == 0, shown.stderr
    lines = shown.stderr.splitlines()
    assert lines and all(line.startswith("chunks sent: ") for line in lines)
    assert lines[-1] == f"chunks sent: {doc['chunks']}/{doc['chunks']}" and len(lines) <= 10


def test_bad_input_exits_2(fleet_file: Path, outdir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(fleet_file.read_text().replace("  canary: [cam-01]", "  canary: [cam-09]"))
    result = slimfleet("publish", outdir, "--name", "n", "--version", "1", "--fleet", bad)
    assert result.returncode == 2
    assert one_line_error(result).startswith(f"error: {bad}:21: groups.canary[0]: device 'cam-09'")

    result = slimfleet("publish", outdir, "--name", "n", "--version", "0", "--fleet", fleet_file)
    assert result.returncode == 2
    assert (
        one_line_error(result)
        == "error: model version must be from 1 to 9223372036854775807, got 0"
    )

    no_keys = tmp_path / "nokeys" / "fleet.yaml"
    no_keys.parent.mkdir()
    no_keys.write_text(fleet_file.read_text())
    result = slimfleet("publish", outdir, "--name", "n", "--version", "1", "--fleet", no_keys)
    assert result.returncode == 2 and "run 'slimfleet keys generate'" in one_line_error(result)


def test_broker_down_exits_1_with_one_line(fleet_file: Path, outdir: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    args = ["publish", outdir, "--name", "n", "--version", "1"]
    result = slimfleet(*args, "--fleet", fleet_file, broker=url)
    assert result.returncode == 1
    assert one_line_error(result).startswith(f"error: cannot reach the MQTT broker at {url}")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_broker_command_serves_until_stopped(
    stop: signal.Signals, fleet_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port, timeout=30)
        fleet = load_fleet(fleet_file, broker_url=f"mqtt://127.0.0.1:{port}")
        model = models.save(models.add_one(), tmp_path / "a.onnx")
        assert publish_model(fleet, model, "a", 1).published
        assert not publish_model(fleet, model, "a", 1).published
        proc.send_signal(stop)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert f"listening on mqtt://127.0.0.1:{port}" in stderr
