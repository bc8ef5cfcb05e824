"""The fleet's keys: the offline root, certified signing keys, and revocation.

The root private key never needs to be on the publishing host: it is read from the
path given to ``keys generate``/``keys revoke`` (a USB stick, say) and used only to sign
a certificate or a revocation list (see :mod:`slimfleet.agent.keyring`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.keyring import (
    KEY_ID,
    MAX_REVOKED,
    Certificate,
    KeyRing,
    issue_certificate,
    issue_revocations,
    revocation_topic,
)
from slimfleet.agent.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    read_trust_file,
)
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.mqttio import BrokerLink

log = logging.getLogger(__name__)

MAX_CERT_LIFETIME_S = 10 * 365 * 86400


def generate_keys(private_path: Path, public_path: Path, what: str = "signing key") -> str:
    """Write a new key pair (private key mode 0600) and return its key id.

    Refuses to overwrite either file: losing a private key means re-keying every device.
    """
    for path in (private_path, public_path):
        if path.exists():
            raise InputError(f"{path} already exists; refusing to overwrite a {what}")
    try:
        for path in (private_path, public_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        return generate_keypair(private_path, public_path)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and Path(exc.filename) == private_path:
            raise InputError(f"{private_path} already exists; refusing to overwrite it") from None
        raise InputError(
            f"cannot write the key pair: {exc.strerror or exc}: {exc.filename}"
        ) from None


def _load_root(root_private: Path, fleet: FleetConfig | None) -> Any:
    root = load_private_key(root_private)
    if fleet is not None and fleet.root_key is not None:
        pinned = key_id(load_public_key(fleet.root_key))
        if key_id(root.public_key()) != pinned:
            raise InputError(
                f"{root_private} is not the private key of the root {fleet.root_key} "
                f"({pinned}) that devices pin"
            )
    return root


def generate_signing_key(
    private_path: Path,
    public_path: Path,
    certificate_path: Path,
    root_private: Path,
    *,
    lifetime_s: float,
    purpose: str | None = None,
    fleet: FleetConfig | None = None,
) -> Certificate:
    """A new signing key pair plus its certificate, valid from now for ``lifetime_s``,
    signed by the root private key at ``root_private`` (checked against fleet.yaml's
    ``keys.root`` when ``fleet`` is given). Never overwrites a file."""
    if certificate_path.exists():
        raise InputError(f"{certificate_path} already exists; refusing to overwrite it")
    root = _load_root(root_private, fleet)
    generate_keys(private_path, public_path)
    now = time.time()
    payload = issue_certificate(
        root,
        load_public_key(public_path),
        not_before=now,
        expires=now + lifetime_s,
        purpose=purpose,
    )
    _write_new(certificate_path, payload)
    return KeyRing([root.public_key()]).certificate(payload, str(certificate_path))


def _write_new(path: Path, payload: bytes, mode: int = 0o644) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _local_revocations(fleet: FleetConfig, ring: KeyRing) -> None:
    path = fleet.revocations_file
    if path.exists():
        try:
            ring.apply_revocations(read_trust_file(path), str(path))
        except (OSError, ValueError, VerifyError) as exc:
            raise InputError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class Revocation:
    """What ``revoke`` published: the new list's seq and every key id it revokes."""

    key_id: str
    seq: int
    revoked: list[str]
    topic: str


def revoke(
    fleet: FleetConfig, kid: str, root_private: Path, *, timeout: float = 10.0
) -> Revocation:
    """Add ``kid`` to the revocation list and publish it, retained, signed by the root.

    The new seq is one above the newest of the broker's list and the local copy (both
    must be signed by this root); the local copy is updated after the broker confirms.
    """
    if not KEY_ID.fullmatch(kid):
        raise InputError(f"bad key id {kid!r}: expected 16 lowercase hex digits")
    root = _load_root(root_private, fleet)
    if kid == key_id(root.public_key()):
        raise InputError(f"{kid} is the root key: make a new root and re-enrol devices instead")
    ring = KeyRing([root.public_key()])
    _local_revocations(fleet, ring)
    topic = revocation_topic(fleet.prefix)
    with BrokerLink(fleet.broker, timeout=timeout) as link:
        published = link.read_retained([topic]).get(topic)
        if published is not None:
            try:
                ring.apply_revocations(published, f"{topic} on {fleet.broker.url}")
            except VerifyError as exc:  # older, or forged: devices refuse it, ours replaces it
                log.warning("replacing the published revocation list: %s", exc)
        revoked = sorted(ring.revoked | {kid})
        if len(revoked) > MAX_REVOKED:
            raise InputError(
                f"the revocation list is full ({MAX_REVOKED} keys, devices refuse a longer "
                "one): make a new root and re-enrol devices"
            )
        payload = issue_revocations(root, ring.revocation_seq + 1, revoked, time.time())
        link.publish_all([(topic, payload)])
    ring.revocations_path = fleet.revocations_file
    ring.apply_revocations(payload)
    return Revocation(kid, ring.revocation_seq, revoked, topic)


def list_keys(fleet: FleetConfig) -> list[dict[str, Any]]:
    """The root, the signing key and every certificate in or under its folder, with their
    state (valid, expired, not yet valid, revoked per the host's revocation list)."""
    rows: list[dict[str, Any]] = []
    checker, revoked = None, frozenset[str]()
    if fleet.root_key is not None:
        root = load_public_key(fleet.root_key)
        rows.append({"role": "root", "key_id": key_id(root), "file": str(fleet.root_key)})
        checker = KeyRing([root])  # no revocations: a revoked key's row says "revoked"
        ring = KeyRing([root])
        _local_revocations(fleet, ring)
        revoked = ring.revoked
    current = key_id(load_public_key(fleet.public_key))
    certs = sorted(fleet.public_key.parent.rglob("*.cert"))
    if fleet.certificate is not None and fleet.certificate not in certs:
        certs.insert(0, fleet.certificate)
    listed = set()
    for path in certs:
        row = _certificate_row(path, checker, revoked)
        listed.add(row.get("key_id"))
        row["in_use"] = row.get("key_id") == current
        rows.append(row)
    if current not in listed:
        rows.append({"role": "signing", "key_id": current, "file": str(fleet.public_key)})
        rows[-1].update(in_use=True, state="pinned (no certificate)")
    return rows


def _certificate_row(
    path: Path, checker: KeyRing | None, revoked: frozenset[str]
) -> dict[str, Any]:
    row: dict[str, Any] = {"role": "signing", "file": str(path)}
    try:
        payload = read_trust_file(path)
        if checker is None:
            row["state"] = "unchecked (no keys.root in fleet.yaml)"
            return row
        cert = checker.certificate(payload, str(path), allow_expired=True)
    except (OSError, ValueError, VerifyError) as exc:
        row["state"] = f"invalid: {exc}"
        return row
    row.update(key_id=cert.key_id, not_before=cert.not_before, expires=cert.expires)
    row["purpose"] = cert.purpose
    now = time.time()
    if cert.key_id in revoked:
        row["state"] = "revoked"
    elif cert.problem(now) is None:
        row["state"] = "valid"
    else:
        row["state"] = "expired" if now >= cert.expires else "not yet valid"
    return row
