"""Attacks on the broker's copy of a model: what 'slimfleet verify' finds and
'slimfleet publish --repair' puts right, over mutual TLS as the host role."""

from __future__ import annotations

import json
from pathlib import Path

import models
import pytest
from click.testing import CliRunner, Result
from securefleet import SecureFleet

from slimfleet.host.cli import cli
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.publish import publish_model


def slimfleet(*args: str | Path) -> Result:
    """The command in-process, as a user runs it (without a $SLIMFLEET_BROKER override)."""
    return CliRunner().invoke(cli, list(map(str, args)), env={"SLIMFLEET_BROKER": None})


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return models.save(models.conv_bn_net(), tmp_path / "model.onnx")


def test_tampered_retained_chunk_is_found_and_repaired(
    secure: SecureFleet, model_file: Path
) -> None:
    fleet = secure.fleet
    result = publish_model(fleet, model_file, "tamper", 1, chunk_size=4096)
    assert result.published and result.chunks > 3
    clean = slimfleet("verify", "tamper@1", "--fleet", secure.path, "--file", model_file)
    assert clean.exit_code == 0, clean.output
    # someone with write access to the broker swaps chunk 1 and deletes chunk 3
    with BrokerLink(fleet.broker) as link:
        link.publish_all([(fleet.topics.chunk("tamper", 1, 1), b"evil bytes")])
        link.client.publish(fleet.topics.chunk("tamper", 1, 3), b"", qos=1, retain=True)
    found = slimfleet("verify", "tamper@1", "--fleet", secure.path, "--json")
    assert found.exit_code == 1, found.output
    doc = json.loads(found.stdout)
    assert doc["ok"] is False
    assert doc["bad_chunks"]["1"].startswith("wrong bytes") and doc["bad_chunks"]["3"] == "missing"
    assert set(doc["bad_chunks"]) == {"1", "3"}
    text = slimfleet("verify", "tamper@1", "--fleet", secure.path)
    assert "tamper@1: chunk 1: wrong bytes" in text.stdout
    # plain publish does not look; --repair re-sends exactly the two chunks
    again = publish_model(fleet, model_file, "tamper", 1, chunk_size=4096)
    assert not again.published and again.repaired is None
    repaired = slimfleet(
        "publish", model_file, "--name", "tamper", "--version", "1", "--chunk-size", "4096",
        "--fleet", secure.path, "--repair", "--json",
    )  # fmt: skip
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["repaired"] == {"chunks": [1, 3], "manifest": False}
    after = slimfleet("verify", "tamper@1", "--fleet", secure.path, "--file", model_file)
    assert after.exit_code == 0, after.output


def test_tampered_manifest_is_found_and_re_signed(secure: SecureFleet, model_file: Path) -> None:
    fleet = secure.fleet
    publish_model(fleet, model_file, "forged", 1)
    topic = fleet.topics.manifest("forged", 1)
    with BrokerLink(fleet.broker) as link:
        envelope = json.loads(link.read_retained([topic])[topic])
        envelope["signed"]["size"] += 1
        link.publish_all([(topic, json.dumps(envelope).encode())])
    found = slimfleet("verify", "forged@1", "--fleet", secure.path)
    assert found.exit_code == 1 and "manifest: does not verify" in found.stdout
    fixed = publish_model(fleet, model_file, "forged", 1, repair=True)
    assert fixed.repaired == {"chunks": [], "manifest": True}
    assert slimfleet("verify", "forged@1", "--fleet", secure.path).exit_code == 0


def test_the_generated_config_keeps_published_models_across_a_restart(
    secure: SecureFleet, model_file: Path
) -> None:
    publish_model(secure.fleet, model_file, "kept", 1)
    secure.broker.restart()
    assert slimfleet("verify", "kept@1", "--fleet", secure.path).exit_code == 0
