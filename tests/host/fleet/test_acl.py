"""'slimfleet acl': roles, mosquitto's password hashes and files, checked on real mosquitto."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from securefleet import SecureFleet, connect

from slimfleet.agent.errors import ConfigError, InputError
from slimfleet.host.cli import cli
from slimfleet.host.fleet.acl import (
    READ,
    WRITE,
    Grant,
    allowed,
    check_password,
    covers,
    hash_password,
    role_grants,
)
from slimfleet.host.fleet.config import load_fleet

P = "fleet/x"


def test_a_device_reads_its_desired_state_models_and_keys_and_writes_its_own_reports() -> None:
    grants = role_grants("device", P, "cam-01")
    assert allowed(grants, f"{P}/devices/cam-01/desired", READ)
    assert not allowed(grants, f"{P}/devices/cam-01/desired", WRITE)
    assert not allowed(grants, f"{P}/devices/cam-02/desired", READ)
    assert not allowed(grants, f"{P}/devices/+/desired", READ)
    assert allowed(grants, f"{P}/models/m/3/chunk/+", READ)
    assert allowed(grants, f"{P}/keys/revocations", READ)
    assert not allowed(grants, f"{P}/models/m/3/manifest", WRITE)
    for leaf in ("state", "status", "telemetry", "events"):
        assert allowed(grants, f"{P}/devices/cam-01/{leaf}", WRITE)
        assert not allowed(grants, f"{P}/devices/cam-02/{leaf}", WRITE)
        assert not allowed(grants, f"{P}/devices/cam-02/{leaf}", READ)
    assert not allowed(grants, "other/devices/cam-01/desired", READ)


def test_host_writes_everything_under_the_prefix_and_a_monitor_only_reads() -> None:
    host, monitor = role_grants("host", P, "host"), role_grants("monitor", P, "mon")
    assert allowed(host, f"{P}/rollouts/r1", WRITE) and allowed(host, f"{P}/#", READ)
    assert not allowed(host, "elsewhere/x", WRITE)
    assert allowed(monitor, f"{P}/devices/+/telemetry", READ)
    assert not allowed(monitor, f"{P}/devices/a/state", WRITE)
    with pytest.raises(ValueError, match="unknown role"):
        role_grants("admin", P, "root")


@pytest.mark.parametrize(
    ("grant", "topic", "expected"),
    [
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/+/c", True),
        ("a/b/c", "a/+/c", False),
        ("a/+", "a/#", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_covers(grant: str, topic: str, expected: bool) -> None:
    assert covers(grant, topic) is expected
    assert Grant(READ, grant).allows(READ) and not Grant(READ, grant).allows(WRITE)


def test_password_hashes_match_mosquitto_passwd_both_ways(tmp_path: Path) -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("$7$101$") and check_password("correct horse", hashed)
    assert not check_password("wrong", hashed) and not check_password("x", "$6$junk")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", passwd, "u", "their pw"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$") and check_password("their pw", theirs)


def test_real_mosquitto_accepts_the_generated_password_file(tmp_path: Path) -> None:
    secure = SecureFleet(tmp_path, "pw/test", tls=False)
    secure.broker.start()
    try:
        for user in ("cam-01", "monitor", "host"):
            probe = connect(secure.settings(user), f"{user}-1")
            assert probe.accepted, user
            probe.close()
        wrong = secure.settings("cam-01")
        for settings in (
            type(wrong)(wrong.host, wrong.port, username="cam-01", password="guess"),
            type(wrong)(wrong.host, wrong.port),
            # a device's password is not valid on the host listener
            type(wrong)(wrong.host, secure.host_port, username="cam-01", password=wrong.password),
        ):
            probe = connect(settings, "cam-02")
            assert not probe.accepted
            probe.close()
    finally:
        secure.broker.stop()


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, list(map(str, args)), env={"SLIMFLEET_BROKER": None})


def test_acl_command_writes_private_files_and_never_prints_a_password(tmp_path: Path) -> None:
    secure = SecureFleet(tmp_path, "cli/test", tls=False)
    first = invoke("acl", "--fleet", secure.path, "--no-tls", "--out", tmp_path / "out", "--json")
    assert first.exit_code == 0, first.output
    doc = json.loads(first.output)
    assert doc["users"] == {
        "cam-01": "device",
        "cam-02": "device",
        "host": "host",
        "monitor": "monitor",
    }
    assert doc["new_passwords"] == []  # SecureFleet already made them; they are kept
    passwords = [p.read_text().strip() for p in secure.identities.secrets.glob("*.password")]
    assert len(passwords) == 4 and not any(p in first.output for p in passwords)
    for name in doc["files"]:
        mode = stat.S_IMODE((tmp_path / "out" / name).stat().st_mode)
        assert mode == 0o600, name
    conf = (tmp_path / "out" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "use_username_as_clientid true" in conf
    assert "max_packet_size" in conf and "message_size_limit" in conf
    no_certs = invoke("acl", "--fleet", secure.path)  # run_cli: InputError is exit 2
    assert isinstance(no_certs.exception, InputError)
    assert "run 'slimfleet certs' first" in str(no_certs.exception)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--bind", "127.0.0.1\nallow_anonymous true", "--bind .*not an IP address or host name"),
        ("--bind", "bad host", "not an IP address or host name"),
        ("--device-port", "70000", "70000 is not in the range 1<=x<=65535"),
        ("--host-port", "0", "0 is not in the range 1<=x<=65535"),
    ],
)
def test_nothing_unchecked_reaches_mosquitto_conf(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    """A newline in --bind once wrote 'allow_anonymous true' into both listeners."""
    secure = SecureFleet(tmp_path, "cli/test", tls=False)
    out = tmp_path / "out"
    result = invoke("acl", "--fleet", secure.path, "--no-tls", "--out", out, option, value)
    # click's usage errors exit 2 here; an InputError does under run_cli
    assert result.exit_code == 2 or isinstance(result.exception, InputError)
    assert re.search(message, str(result.exception) + result.output)
    assert not (out / "mosquitto.conf").exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("identities:\n  host: [cam-01]\n", "fleet.yaml:8: identities.host.*'cam-01' is already"),
        ("identities:\n  monitors: [host]\n", "default host username .host. is already taken"),
        ("identities:\n  host: []\n", "host role needs at least one username"),
        ("identities:\n  admins: [x]\n", "unknown key 'admins'"),
        ("identities:\n  host: [../x]\n", "fleet.yaml:8: .*username: invalid name"),
    ],
)
def test_bad_identities_name_file_and_line(tmp_path: Path, section: str, message: str) -> None:
    text = (
        "broker: mqtt://127.0.0.1:1883\nprefix: p\nkeys: {private: k, public: p}\n"
        "devices:\n  cam-01:\n  cam-02:\n" + section
    )
    (tmp_path / "fleet.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_fleet(tmp_path / "fleet.yaml")


def test_identities_alone_means_defaults_which_must_not_clash(tmp_path: Path) -> None:
    head = "broker: mqtt://b\nprefix: p\nkeys: {private: k, public: p}\ndevices:\n  cam-01:\n"
    (tmp_path / "fleet.yaml").write_text(head + "identities:\n")
    ids = load_fleet(tmp_path / "fleet.yaml").identities
    assert ids is not None and (ids.hosts, ids.monitors) == (("host",), ("monitor",))
    assert ids.secrets == tmp_path / "secrets" and ids.certs == tmp_path / "certs"
    (tmp_path / "fleet.yaml").write_text(head + "  monitor:\nidentities:\n")
    with pytest.raises(ConfigError, match="default monitors username 'monitor' is already taken"):
        load_fleet(tmp_path / "fleet.yaml")
