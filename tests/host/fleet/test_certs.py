"""'slimfleet certs': a CA, the broker's certificate and one client certificate per identity."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slimfleet.agent.errors import InputError
from slimfleet.host.cli import cli
from slimfleet.host.fleet.certs import issue_certs

FLEET = """\
broker: mqtt://127.0.0.1:1883
prefix: p
keys: {private: k/s.key, public: k/s.pub}
devices: {cam-01: {}, cam-02: {}}
identities: {host: [ops], monitors: [grafana]}
"""


def common_name(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_certs_command_issues_a_client_certificate_per_identity(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text(FLEET)
    args = ["certs", "--fleet", str(tmp_path / "fleet.yaml"), "--broker-host", "10.0.0.5"]
    result = CliRunner().invoke(cli, [*args, "--broker-host", "broker.lan", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    certs = tmp_path / "certs"
    assert sorted(doc["issued"]) == ["broker", "ca", "cam-01", "cam-02", "grafana", "ops"]
    for name in doc["issued"]:
        assert stat.S_IMODE((certs / f"{name}.key").stat().st_mode) == 0o600
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", certs / "ca.pem", certs / f"{name}.pem"],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0, verify.stderr
    assert common_name(certs / "cam-02.pem") == "cam-02"
    client = x509.load_pem_x509_certificate((certs / "cam-01.pem").read_bytes())
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    broker = x509.load_pem_x509_certificate((certs / "broker.pem").read_bytes())
    names = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names] == ["10.0.0.5", "broker.lan"]
    # run again after adding a device: only the new one is issued, the CA is kept
    (tmp_path / "fleet.yaml").write_text(FLEET.replace("cam-02: {}", "cam-02: {}, cam-03: {}"))
    again = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert again["issued"] == ["cam-03"] and "ca" in again["kept"]


@pytest.mark.parametrize(
    ("users", "hosts", "days", "message"),
    [
        (["cam-01"], [""], 825, "--broker-host '': not an IP address or host name"),
        (["cam-01"], ["a" * 40 + "." + "b" * 29], 825, "70 characters.*at most 64"),
        (["c" * 100], ["broker.lan"], 825, "100 characters.*at most 64"),
        (["cam-01"], ["broker.lan\nlistener 1"], 825, "not an IP address or host name"),
        (["cam-01"], ["broker.lan"], 99999999, "days must be 1 to 3650"),
    ],
)
def test_names_a_certificate_cannot_hold_are_refused_before_anything_is_written(
    tmp_path: Path, users: list[str], hosts: list[str], days: int, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        issue_certs(tmp_path / "certs", users, hosts, days=days)
    assert not (tmp_path / "certs").exists()  # no CA left behind


def test_refuses_names_that_would_overwrite_the_ca(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="clashes with the CA"):
        issue_certs(tmp_path, ["ca"], ["b"])
    with pytest.raises(InputError, match="at least one broker host"):
        issue_certs(tmp_path, ["cam-01"], [])
    (tmp_path / "ca.pem").write_text("half a CA")
    with pytest.raises(InputError, match="must both exist"):
        issue_certs(tmp_path, ["cam-01"], ["b"])
