"""``slimfleet keys``: an offline root, certified signing keys, rotation and revocation,
end to end on a real mosquitto, checked by a device's key ring and link."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from brokers import Mosquitto, free_port

from slimfleet.agent.cli_runner import run_cli
from slimfleet.agent.config import load_agent_config
from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.inbox import DOCUMENT_LIMIT
from slimfleet.agent.keyring import (
    MAX_REVOKED,
    issue_certificate,
    issue_revocations,
    revocation_topic,
)
from slimfleet.agent.link import Backoff, Link
from slimfleet.agent.mqtt import BrokerSettings
from slimfleet.agent.signing import load_private_key, load_public_key
from slimfleet.host.cli import cli
from slimfleet.host.fleet.config import BROKER_ENV, load_fleet
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.publish import publish_model

FLEET = """\
broker: {url}
prefix: {prefix}
keys:
  private: {keys}/signing.key
  public: {keys}/signing.pub
  certificate: {keys}/signing.cert
  root: root/root.pub
  revocations: revoked.json
devices:
  cam-01: {{}}
"""


@pytest.fixture
def run(capsys, monkeypatch):
    """``run(*args) -> (exit code, stdout, stderr)``: the real entry point, in process."""
    monkeypatch.delenv(BROKER_ENV, raising=False)

    def invoke(*args: str | Path) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["slimfleet", *map(str, args)])
        with pytest.raises(SystemExit) as exited:
            run_cli(cli, "slimfleet")
        out, err = capsys.readouterr()
        return exited.value.code, out, err

    return invoke


def write_fleet(tmp_path: Path, url: str, prefix: str, keys: str = "keys") -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.format(url=url, prefix=prefix, keys=keys))
    return path


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def rooted(tmp_path: Path, mosquitto: Mosquitto, prefix: str, run):
    """A fleet file on the test broker and a fresh root key pair in tmp_path/root."""
    code, out, err = run("keys", "root", "--out", tmp_path / "root", "--json")
    assert code == 0, err
    assert (tmp_path / "root" / "root.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "agent.yaml").write_text(
        f"device_id: cam-01\nbroker: {mosquitto.url}\nprefix: {prefix}\n"
        "keys: {root: root/root.pub}\nstore_dir: store\n"
    )
    return write_fleet(tmp_path, mosquitto.url, prefix), json.loads(out)["key_id"]


def read_manifest(fleet_path: Path, name: str, version: int) -> bytes:
    fleet = load_fleet(fleet_path)
    topic = fleet.topics.manifest(name, version)
    with BrokerLink(fleet.broker, timeout=10) as link:
        return link.read_retained([topic])[topic]


def test_rotation_and_revocation_end_to_end(tmp_path, mosquitto, prefix, outdir, run, rooted):
    fleet_path, root_id = rooted
    root_key = tmp_path / "root" / "root.key"
    code, out, err = run(
        "keys", "generate", "--root-key", root_key, "--expires", "30d", "--fleet", fleet_path,
        "--json",
    )  # fmt: skip
    assert code == 0, err
    first = json.loads(out)
    assert 29.9 * 86400 < first["expires"] - time.time() <= 30 * 86400
    publish_model(load_fleet(fleet_path), outdir, "ocr", 1)

    # The device pins only the root and never changes its agent.yaml.
    device = load_agent_config(tmp_path / "agent.yaml").verifier(tmp_path / "device-revoked.json")
    assert (
        device.verify(read_manifest(fleet_path, "ocr", 1), "manifest")["key_id"] == first["key_id"]
    )

    # Rotation: a new key in keys2/, and the host's fleet.yaml points at it.
    code, out, err = run(
        "keys", "generate", "--root-key", root_key, "--out", tmp_path / "keys2",
        "--fleet", fleet_path, "--json",
    )  # fmt: skip
    assert code == 0, err
    second = json.loads(out)["key_id"]
    fleet_path = write_fleet(tmp_path, mosquitto.url, prefix, keys="keys2")
    publish_model(load_fleet(fleet_path), outdir, "ocr", 2)
    v2 = read_manifest(fleet_path, "ocr", 2)
    assert device.verify(v2, "manifest")["key_id"] == second

    # Revocation: the device's link hears the retained list and refuses the old key.
    link = Link(BrokerSettings.from_url(mosquitto.url), f"dev-{prefix}", backoff=Backoff(0.1, 0.5))
    sub = link.subscribe([revocation_topic(prefix)], max_bytes=DOCUMENT_LIMIT)
    link.start()
    try:
        code, out, err = run("keys", "revoke", first["key_id"], "--root-key", root_key,
                             "--fleet", fleet_path, "--json")  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["seq"] == 1
        message = sub.get(timeout=10)
        assert message is not None
        assert device.apply_revocations(message.payload) == {first["key_id"]}
        with BrokerLink(load_fleet(fleet_path).broker, timeout=10) as host:  # retained
            topic = revocation_topic(prefix)
            assert host.read_retained([topic])[topic] == message.payload
    finally:
        link.stop()
    with pytest.raises(VerifyError, match=f"revoked key {first['key_id']}"):
        device.verify(read_manifest(fleet_path, "ocr", 1), "manifest")
    assert device.verify(v2, "manifest")["key_id"] == second
    # persisted for the daemon: a restarted device still refuses the revoked key
    restarted = load_agent_config(tmp_path / "agent.yaml").verifier(
        tmp_path / "device-revoked.json"
    )
    assert restarted.is_revoked(first["key_id"])

    code, out, err = run("keys", "list", "--fleet", fleet_path, "--json")
    assert code == 0, err
    states = {row["key_id"]: (row["role"], row.get("state"), row.get("in_use"))
              for row in json.loads(out)["keys"]}  # fmt: skip
    assert states[root_id][0] == "root"
    assert states[second] == ("signing", "valid", True)
    old_fleet = write_fleet(tmp_path, mosquitto.url, prefix)
    code, out, err = run("keys", "list", "--fleet", old_fleet)
    assert code == 0, err
    assert f"{first['key_id']} revoked" in out and "(in use)" in out
    # The host refuses to sign with the revoked key, and to assign what it signed.
    with pytest.raises(InputError, match=f"key {first['key_id']} is revoked"):
        publish_model(load_fleet(old_fleet), outdir, "ocr", 3)
    fleet_path = write_fleet(tmp_path, mosquitto.url, prefix, keys="keys2")  # the same file
    code, _, err = run("assign", "ocr@1", "--device", "cam-01", "--fleet", fleet_path)
    assert code == 2 and f"revoked key {first['key_id']}" in one_line(err), err

    # A second revocation continues the sequence and keeps the first one.
    code, out, err = run("keys", "revoke", second, "--root-key", root_key, "--fleet", fleet_path,
                         "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["seq"] == 2
    assert json.loads(out)["revoked"] == sorted([first["key_id"], second])


def test_key_cli_errors_are_one_line_and_exit_2(tmp_path, mosquitto, prefix, run, rooted):
    fleet_path, root_id = rooted
    root_key = tmp_path / "root" / "root.key"
    code, _, err = run("keys", "root", "--out", tmp_path / "root")
    assert code == 2 and "already exists; refusing to overwrite a root key" in one_line(err)

    cases = [
        (("keys", "revoke", "not-a-key"), "bad key id 'not-a-key'"),
        (("keys", "revoke", "0123456789abcdef"), "--root-key is required"),
        (("keys", "revoke", root_id), "is the root key"),
        (
            ("keys", "generate", "--expires", "soon"),
            "--expires 'soon': expected a duration such as 90s",
        ),
        (("keys", "generate", "--expires", "0d"), "--expires '0d': expected a duration"),
        (("keys", "generate", "--root-key", tmp_path / "nope.key"), "cannot read signing key"),
    ]
    for args, message in cases:
        extra = () if "--root-key" in args or "is required" in message else ("--root-key", root_key)
        code, _, err = run(*args, *extra, "--fleet", fleet_path)
        assert code == 2, (args, err)
        assert message in one_line(err), args

    # a root key that is not the root fleet.yaml (and devices) pin
    code, _, err = run("keys", "root", "--out", tmp_path / "other")
    assert code == 0, err
    code, _, err = run("keys", "generate", "--root-key", tmp_path / "other" / "root.key",
                       "--fleet", fleet_path)  # fmt: skip
    assert code == 2 and "is not the private key of the root" in one_line(err)
    assert not (tmp_path / "keys").exists()  # nothing half-written

    # an uncertified key for a fleet whose devices pin a root would be refused by all
    code, _, err = run("keys", "generate", "--fleet", fleet_path)
    assert code == 2 and "pass --root-key" in one_line(err)

    # no certificate path in fleet.yaml
    plain = tmp_path / "plain.yaml"
    plain.write_text(fleet_path.read_text().replace("  certificate: keys/signing.cert\n", ""))
    code, _, err = run("keys", "generate", "--root-key", root_key, "--fleet", plain)
    assert code == 2 and "has no 'certificate:' path" in one_line(err)

    # a full revocation list (devices refuse a longer one)
    full = [f"{i:016x}" for i in range(MAX_REVOKED)]
    load_fleet(fleet_path).revocations_file.write_bytes(
        issue_revocations(load_private_key(root_key), 5, full, time.time())
    )
    code, _, err = run("keys", "revoke", "f" * 16, "--root-key", root_key, "--fleet", fleet_path)
    assert code == 2 and "the revocation list is full" in one_line(err)

    # an unreachable broker
    down = write_fleet(tmp_path, f"mqtt://127.0.0.1:{free_port()}", prefix)
    code, _, err = run("keys", "revoke", "0123456789abcdef", "--root-key", root_key,
                       "--fleet", down)  # fmt: skip
    assert code == 2 and "cannot reach the MQTT broker" in one_line(err)


def test_publishing_with_an_expired_certificate_is_refused(tmp_path, run, rooted, outdir):
    fleet_path, _ = rooted
    root_key = tmp_path / "root" / "root.key"
    code, _, err = run("keys", "generate", "--root-key", root_key, "--fleet", fleet_path)
    assert code == 0, err
    fleet = load_fleet(fleet_path)
    assert fleet.certificate is not None
    old = time.time() - 10 * 86400
    fleet.certificate.write_bytes(
        issue_certificate(
            load_private_key(root_key),
            load_public_key(fleet.public_key),
            not_before=old,
            expires=old + 86400,
        )
    )
    with pytest.raises(InputError, match="expired"):
        publish_model(fleet, outdir, "ocr", 1)
