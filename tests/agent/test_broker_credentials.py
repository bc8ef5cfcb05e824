"""Credentials in a broker section: by reference (files, environment), never in the clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimfleet.agent.configfile import parse_yaml
from slimfleet.agent.errors import ConfigError
from slimfleet.agent.mqtt import MAX_SECRET_BYTES, BrokerSettings
from slimfleet.host.fleet.certs import issue_certs


def settings(text: str, base: Path) -> BrokerSettings:
    return BrokerSettings.from_node(parse_yaml(text, "f.yaml").require("broker"), base)


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_password_file_and_client_certificate(tmp_path: Path) -> None:
    secret(tmp_path / "pw", "s3cret-line\nignored second line\n")
    issue_certs(tmp_path, ["me"], ["b"])  # ca.pem, me.pem, me.key
    s = settings(
        "broker:\n  url: mqtts://b\n  username: cam-01\n  password_file: pw\n"
        "  ca_file: ca.pem\n  cert_file: me.pem\n  key_file: me.key\n",
        tmp_path,
    )
    assert (s.username, s.password) == ("cam-01", "s3cret-line")
    assert (s.cert_file, s.key_file) == (tmp_path / "me.pem", tmp_path / "me.key")
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("  username: u\n  password_file: open\n", "f.yaml:4: broker.password_file: .* chmod 600"),
        ("  username: u\n  password_file: nope\n", "f.yaml:4: .*nope does not exist"),
        ("  username: u\n  password_file: empty\n", "f.yaml:4: .*is empty"),
        ("  username: u\n  password_file: big\n", f"over {MAX_SECRET_BYTES} bytes"),
        ("  password_file: pw\n", "f.yaml:2: broker: a password needs a username"),
        ("  username: u\n  password_file: pw\n  password_env: P\n", "f.yaml:5: .*not both"),
        ("  username: u\n  username_env: U\n", "give username or username_env"),
        ("  cert_file: pw\n", "cert_file and key_file go together"),
    ],
)
def test_bad_credentials_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    secret(tmp_path / "pw", "ok\n")
    secret(tmp_path / "open", "ok\n", 0o644)
    secret(tmp_path / "empty", "\n")
    secret(tmp_path / "big", "x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(ConfigError, match=message):
        settings("broker:\n  url: mqtts://b\n" + text, tmp_path)


def test_credentials_never_in_the_url_and_tls_files_need_mqtts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no credentials in the broker URL"):
        settings("broker:\n  url: mqtt://u:p@b\n", tmp_path)
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ConfigError, match="f.yaml:2: .*need an mqtts:// URL"):
        settings("broker:\n  url: mqtt://b\n  ca_file: ca.pem\n", tmp_path)
