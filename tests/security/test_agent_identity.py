"""A real agent over mutual TLS with its credentials by reference in agent.yaml."""

from __future__ import annotations

from pathlib import Path

from securefleet import SecureFleet, run_agent


def test_agent_connects_with_its_certificate_and_reports(
    secure: SecureFleet, tmp_path: Path
) -> None:
    run_agent(secure.agent_yaml(tmp_path / "a", "cam-01", "cam-01", secure.device_port), 2.0)
    seen = secure.reports_of("cam-01", secure.fleet.broker, wait=1.0)
    topics = secure.fleet.topics
    assert seen.get(topics.device("cam-01", "status")) is not None
    assert topics.device("cam-01", "state") in seen


def test_agent_with_another_devices_certificate_cannot_report_as_that_device(
    secure: SecureFleet, tmp_path: Path
) -> None:
    """A device that claims to be cam-02 but holds cam-01's certificate."""
    run_agent(secure.agent_yaml(tmp_path / "b", "cam-02", "cam-01", secure.device_port), 2.0)
    assert secure.reports_of("cam-02", secure.fleet.broker, wait=1.0) == {}
