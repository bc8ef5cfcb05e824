"""A real agent over mutual TLS with its credentials by reference in agent.yaml."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from securefleet import SecureFleet, connect

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent


def agent_yaml(secure: SecureFleet, folder: Path, device_id: str, cert: str) -> Path:
    """agent.yaml for ``device_id`` holding identity ``cert``'s certificate and key."""
    certs = secure.identities.certs
    doc = {
        "device_id": device_id,
        "broker": {
            "url": f"mqtts://127.0.0.1:{secure.device_port}",
            "ca_file": str(certs / "ca.pem"),
            "cert_file": str(certs / f"{cert}.pem"),
            "key_file": str(certs / f"{cert}.key"),
            "keepalive": 5,
        },
        "prefix": secure.fleet.prefix,
        "public_keys": [str(secure.fleet.public_key)],
        "store_dir": "store",
        "telemetry_interval_s": 0.5,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "agent.yaml").write_text(yaml.safe_dump(doc))
    return folder / "agent.yaml"


def reports_of(secure: SecureFleet, device: str, wait: float) -> dict[str, bytes]:
    monitor = connect(secure.settings("monitor"), "monitor")
    try:
        return monitor.read(secure.fleet.topics.device(device, "+"), wait=wait)
    finally:
        monitor.close()


def run_agent(config_path: Path, seconds: float) -> None:
    agent = Agent(load_agent_config(config_path))
    agent.start()
    try:
        time.sleep(seconds)
    finally:
        agent.stop()


def test_agent_connects_with_its_certificate_and_reports(secure: SecureFleet, tmp_path) -> None:
    run_agent(agent_yaml(secure, tmp_path / "a", "cam-01", "cam-01"), 2.0)
    seen = reports_of(secure, "cam-01", wait=1.0)
    topics = secure.fleet.topics
    assert seen.get(topics.device("cam-01", "status")) is not None
    assert topics.device("cam-01", "state") in seen


def test_agent_with_another_devices_certificate_cannot_report_as_that_device(
    secure: SecureFleet, tmp_path
) -> None:
    """A device that claims to be cam-02 but holds cam-01's certificate."""
    run_agent(agent_yaml(secure, tmp_path / "b", "cam-02", "cam-01"), 2.0)
    assert reports_of(secure, "cam-02", wait=1.0) == {}
