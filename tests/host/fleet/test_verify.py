"""verify_published and publish --repair on mosquitto, without identities."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import models
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.publish import publish_model
from slimfleet.host.fleet.verify import verify_published


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return models.save(models.conv_bn_net(), tmp_path / "m.onnx")


def test_nothing_published_is_one_problem(fleet: FleetConfig) -> None:
    report = verify_published(fleet, "absent", 1)
    assert not report.ok and report.problems == ["manifest: missing"]
    assert report.to_dict()["ok"] is False


def test_a_clean_copy_verifies_and_a_different_local_file_is_named(
    fleet: FleetConfig, model: Path, tmp_path: Path
) -> None:
    publish_model(fleet, model, "m", 1, chunk_size=8192)
    report = verify_published(fleet, "m", 1, model)
    assert report.ok and report.chunks > 1
    other = models.save(models.mlp(), tmp_path / "other.onnx")
    report = verify_published(fleet, "m", 1, other)
    assert report.problems == [f"{other} is not the published model (its sha256 differs)"]


def test_a_manifest_signed_by_another_key_does_not_verify(
    fleet: FleetConfig, model: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "rogue"
    generate_keys(keys / "s.key", keys / "s.pub")
    rogue = replace(fleet, private_key=keys / "s.key", public_key=keys / "s.pub")
    publish_model(rogue, model, "m", 1)
    report = verify_published(fleet, "m", 1)
    assert len(report.problems) == 1 and report.problems[0].startswith("manifest: does not verify")
    repaired = publish_model(fleet, model, "m", 1, repair=True)
    assert repaired.repaired == {"chunks": [], "manifest": True}
    assert verify_published(fleet, "m", 1).ok


def test_repair_publishes_what_was_never_sent_and_refuses_other_bytes(
    fleet: FleetConfig, model: Path, tmp_path: Path
) -> None:
    result = publish_model(fleet, model, "m", 1, chunk_size=16384, repair=True)
    assert result.repaired == {"chunks": list(range(result.chunks)), "manifest": True}
    assert verify_published(fleet, "m", 1, model).ok
    other = models.save(models.mlp(), tmp_path / "other.onnx")
    with pytest.raises(InputError, match="versions are immutable"):
        publish_model(fleet, other, "m", 1, repair=True)


def test_repair_keeps_a_valid_manifest_and_its_chunk_size(fleet: FleetConfig, model: Path) -> None:
    publish_model(fleet, model, "m", 1, chunk_size=4096)
    with BrokerLink(fleet.broker) as link:
        link.publish_all([(fleet.topics.chunk("m", 1, 2), b"bad")])
    assert verify_published(fleet, "m", 1).bad_chunks.keys() == {2}
    fixed = publish_model(fleet, model, "m", 1, repair=True)  # default chunk size locally
    assert fixed.repaired == {"chunks": [2], "manifest": False}
    assert verify_published(fleet, "m", 1, model).ok
