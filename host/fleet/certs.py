"""A fleet CA and its certificates for mutual TLS (the ``cryptography`` package).

``slimfleet certs`` writes into the fleet's certs folder:

- ``ca.pem`` / ``ca.key``: the CA (EC P-256). Keep ``ca.key`` offline; copy ``ca.pem``
  to every device (its agent.yaml ``ca_file``) and to the broker (``cafile``).
- ``broker.pem`` / ``broker.key``: the broker's server certificate, for the host names
  and addresses given.
- ``<username>.pem`` / ``<username>.key``: one client certificate per identity, its
  common name the username (mosquitto's ``use_identity_as_username``).

Keys are written with mode 0600; existing files are kept (never overwritten), so running
it again after adding devices only issues the new ones.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from slimfleet.agent.errors import InputError
from slimfleet.host.fleet.acl import check_host, write_secret
from slimfleet.host.fleet.keys import MAX_CERT_LIFETIME_S

CA_NAME, BROKER_NAME = "ca", "broker"
DEFAULT_DAYS = 825
MAX_DAYS = MAX_CERT_LIFETIME_S // 86400
COMMON_NAME_LIMIT = 64
"""X.509's upper bound on a common name; a client's is its MQTT username (its id)."""
Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


@dataclass
class IssuedCerts:
    folder: Path
    issued: list[str]  # names whose certificate was made now
    kept: list[str]  # names that already had one

    def to_dict(self) -> dict[str, object]:
        return {"folder": str(self.folder), "issued": self.issued, "kept": self.kept}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(folder / f"{name}.key", pem.decode())
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _build(
    subject: str,
    issuer: Issuer | None,
    days: int,
    *,
    usage: list[x509.ObjectIdentifier] | None = None,
    hosts: list[str] = (),  # type: ignore[assignment]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    signer_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer_key, hashes.SHA256()), key


def load_or_make_ca(folder: Path, days: int) -> tuple[Issuer, bool]:
    """The CA in ``folder`` (made if missing); returns it and whether it was made now."""
    cert_path, key_path = folder / f"{CA_NAME}.pem", folder / f"{CA_NAME}.key"
    if cert_path.exists() != key_path.exists():
        raise InputError(f"{folder}: ca.pem and ca.key must both exist or both be absent")
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{folder}: cannot read the CA: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InputError(f"{key_path}: expected an EC private key")
        return (cert, key), False
    cert, key = _build("slimfleet fleet CA", None, days)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder, CA_NAME, cert, key)
    return (cert, key), True


def issue_certs(
    folder: Path,
    usernames: list[str],
    broker_hosts: list[str],
    *,
    days: int = DEFAULT_DAYS,
) -> IssuedCerts:
    """Make the CA, the broker's certificate and one client certificate per username
    in ``folder``, keeping any that exist."""
    if not broker_hosts:
        raise InputError("name at least one broker host (--broker-host)")
    if not 1 <= days <= MAX_DAYS:
        raise InputError(f"days must be 1 to {MAX_DAYS}, got {days}")
    broker_hosts = [check_host(host, "--broker-host") for host in broker_hosts]
    for name in (broker_hosts[0], *usernames):  # checked before anything is written
        if len(name) > COMMON_NAME_LIMIT:
            raise InputError(
                f"{name[:20]}...: {len(name)} characters, and a certificate's common name "
                f"holds at most {COMMON_NAME_LIMIT} (a client's is its username, its id)"
            )
    clash = {CA_NAME, BROKER_NAME}.intersection(usernames)
    if clash:
        raise InputError(f"username {sorted(clash)[0]!r} clashes with the CA or broker files")
    ca, made = load_or_make_ca(folder, days)
    result = IssuedCerts(folder, [CA_NAME] if made else [], [] if made else [CA_NAME])
    wanted = [(BROKER_NAME, [ExtendedKeyUsageOID.SERVER_AUTH], broker_hosts)]
    wanted += [(user, [ExtendedKeyUsageOID.CLIENT_AUTH], []) for user in usernames]
    for name, usage, hosts in wanted:
        if (folder / f"{name}.pem").exists() and (folder / f"{name}.key").exists():
            result.kept.append(name)
            continue
        subject = broker_hosts[0] if name == BROKER_NAME else name
        cert, key = _build(subject, ca, days, usage=usage, hosts=hosts)
        _write(folder, name, cert, key)
        result.issued.append(name)
    return result
