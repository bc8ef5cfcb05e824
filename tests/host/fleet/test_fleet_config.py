"""fleet.yaml: the repository's example loads, bad files fail with file:line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from slimfleet.agent.errors import ConfigError, InputError
from slimfleet.host.fleet.certs import issue_certs
from slimfleet.host.fleet.config import BROKER_ENV, load_fleet
from slimfleet.host.fleet.keys import generate_keys

GOOD = """\
broker: mqtt://127.0.0.1:1883
prefix: slimfleet/test
keys:
  private: k/signing.key
  public: k/signing.pub
devices:
  a: {site: lab}
  b:
  c: {rack: 3}
groups:
  canary: [a]
  all: [a, b, c]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_repository_fleet_yaml_is_a_working_example(
    fleet_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BROKER_ENV, raising=False)
    fleet = load_fleet(fleet_yaml)
    assert fleet.broker.url == "mqtt://127.0.0.1:1883"
    assert fleet.prefix == "slimfleet/demo"
    assert fleet.private_key == fleet_yaml.parent / "keys" / "signing.key"
    assert fleet.public_key == fleet_yaml.parent / "keys" / "signing.pub"
    assert set(fleet.groups) == {"canary", "all"}
    assert set(fleet.groups["all"]) == set(fleet.devices)
    assert set(fleet.groups["canary"]) < set(fleet.devices)


def test_paths_are_relative_to_the_file_and_labels_are_strings(tmp_path: Path) -> None:
    fleet = load_fleet(write(tmp_path, GOOD))
    assert fleet.private_key == (tmp_path / "k" / "signing.key").resolve()
    assert fleet.devices == {"a": {"site": "lab"}, "b": {}, "c": {"rack": "3"}}
    assert fleet.groups == {"canary": ["a"], "all": ["a", "b", "c"]}
    assert fleet.topics.manifest("m", 2) == "slimfleet/test/models/m/2/manifest"


def test_broker_url_override_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv(BROKER_ENV, "mqtt://10.0.0.2:1884")
    assert load_fleet(path).broker.url == "mqtt://10.0.0.2:1884"
    assert load_fleet(path, broker_url="mqtts://b.example").broker.url == "mqtts://b.example:8883"
    monkeypatch.setenv(BROKER_ENV, "http://nope")
    with pytest.raises(InputError, match=rf"\${BROKER_ENV}: broker URL must look like"):
        load_fleet(path)


def test_credentials_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    issue_certs(tmp_path, [], ["broker.example"])  # ca.pem: TLS files are loaded when read
    text = GOOD.replace(
        "broker: mqtt://127.0.0.1:1883\n",
        "broker:\n  url: mqtts://broker.example\n  username_env: FLEET_U\n"
        "  password_env: FLEET_P\n  ca_file: ca.pem\n",
    )
    monkeypatch.setenv("FLEET_U", "alice")
    monkeypatch.setenv("FLEET_P", "s3cret")
    broker = load_fleet(write(tmp_path, text)).broker
    assert (broker.tls, broker.port, broker.username, broker.password) == (
        True,
        8883,
        "alice",
        "s3cret",
    )
    assert broker.ca_file == (tmp_path / "ca.pem").resolve()
    monkeypatch.delenv("FLEET_P")
    with pytest.raises(ConfigError, match=r"fleet.yaml:4: .*FLEET_P is not set"):
        load_fleet(write(tmp_path, text))


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        # an unknown key is reported at the key's own line, even with a block value
        ("groups:", "group:", 10, "unknown key 'group'"),
        ("  public: k/signing.pub", "  pub: k/signing.pub", 5, "unknown key 'pub'"),
        ("  all: [a, b, c]", "  all: [a, b, d]", 12, "device 'd' is not declared"),
        ("  all: [a, b, c]", "  all: [a, b, a]", 12, "listed twice in group 'all'"),
        ("  c: {rack: 3}", "  a: {rack: 3}", 9, "duplicate key 'a'"),
        ("prefix: slimfleet/test", "prefix: /slimfleet/test", 2, "must not start or end"),
        ("prefix: slimfleet/test", "prefix: slim/+/test", 2, "must not start with '\\$'"),
        ("prefix: slimfleet/test", "prefix: ''", 2, "non-empty string"),
        ("broker: mqtt://127.0.0.1:1883", "broker: http://x", 1, "mqtt://host:1883"),
        ("  c: {rack: 3}", "  c/d: {rack: 3}", 9, "device id: invalid name"),
        ("  c: {rack: 3}", "  c: {rack: [3]}", 9, "label 'rack' must be a string"),
        ("  canary: [a]", "  canary: []", 11, "group 'canary' has no devices"),
        ("  private: k/signing.key", "  private: k/signing.pub", 5, "must be different"),
        ("keys:\n  private: k/signing.key\n  public: k/signing.pub", "keys: k", 3, "a mapping"),
        ("  a: {site: lab}", "  a: {site: lab", 8, "invalid YAML"),
    ],
)
def test_bad_fleet_files_name_file_and_line(
    tmp_path: Path, old: str, new: str, line: int, message: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_fleet(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line}:"), text
    assert message.replace("\\", "") in text or pytest.fail(text)
    assert "\n" not in text


def test_missing_sections_and_files(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("prefix: slimfleet/test\n", ""))
    with pytest.raises(ConfigError, match=r"fleet.yaml:1: <root>: missing required key 'prefix'"):
        load_fleet(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_fleet(tmp_path / "absent.yaml")


def test_resolve_targets(tmp_path: Path) -> None:
    fleet = load_fleet(write(tmp_path, GOOD))
    assert fleet.resolve(devices=["c", "a"], groups=["canary"]) == ["a", "c"]
    assert fleet.resolve(groups=["all", "canary"]) == ["a", "b", "c"]
    with pytest.raises(InputError, match="unknown group 'prod'"):
        fleet.resolve(groups=["prod"])
    with pytest.raises(InputError, match="unknown device 'zz'"):
        fleet.resolve(devices=["zz"])
    with pytest.raises(InputError, match="name at least one device or group"):
        fleet.resolve()


def test_signer_needs_the_key_and_its_public_pair(tmp_path: Path) -> None:
    fleet = load_fleet(write(tmp_path, GOOD))
    with pytest.raises(InputError, match=r"signing key not found .*keys generate"):
        fleet.signer()
    kid = generate_keys(fleet.private_key, fleet.public_key)
    assert fleet.signer().key_id == kid
    fleet.public_key.unlink()
    with pytest.raises(InputError, match="cannot read public key"):
        fleet.signer()
    generate_keys(tmp_path / "other.key", fleet.public_key)
    with pytest.raises(InputError, match="is not the public key of"):
        fleet.signer()


@pytest.mark.parametrize(
    ("content", "message"), [(None, "not a certificate file"), (b"x" * 70_000, "over 64 KiB")]
)
def test_a_certificate_that_cannot_be_one_is_one_line(make_fleet, tmp_path, content, message):
    """/dev/null or an oversized file once ended in 'internal error: ... strerror'."""
    cert = Path("/dev/null") if content is None else tmp_path / "big.cert"
    if content is not None:
        cert.write_bytes(content)
    fleet = replace(make_fleet("mqtt://127.0.0.1:1883"), certificate=cert)
    with pytest.raises(InputError, match=message):
        fleet.signer()
