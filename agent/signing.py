"""Ed25519 signatures over canonical JSON, in a small TUF-like envelope.

An envelope is ``{"signed": <document>, "signature": <base64>}``; the document
carries the ``key_id`` of the key that signed it, so the signature covers it too.
An envelope may also carry ``"certificate"``: the signing key's certificate, itself an
envelope signed by the fleet's root key (see :mod:`slimfleet.agent.keyring`). It is
outside the signature: the root's signature vouches for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.store import FileTooLarge, read_bounded
from slimfleet.agent.wire import canonical_json, loads_json

log = logging.getLogger(__name__)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new private key (mode 0600) and its public key as PEM; return the key id."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


MAX_TRUST_FILE_BYTES = 64 * 1024
"""Keys are under 1 KiB, certificates and revocation lists under 64 KiB (the document
limit of the topics they travel on): a bigger file (``/dev/zero``) is refused unread."""


def read_trust_file(path: Path | str) -> bytes:
    """The bytes of a key, certificate or revocation-list file (:func:`read_bounded` at
    :data:`MAX_TRUST_FILE_BYTES`)."""
    return read_bounded(path, MAX_TRUST_FILE_BYTES)


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a key or certificate file at ``path`` (at most
    :data:`MAX_TRUST_FILE_BYTES`); an InputError naming ``what`` and why otherwise."""
    try:
        return read_trust_file(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except FileTooLarge:
        raise InputError(
            f"{path}: not a {what} file (over {MAX_TRUST_FILE_BYTES >> 10} KiB)"
        ) from None
    except ValueError as exc:  # not a regular file
        raise InputError(f"{path}: not a {what} file ({exc})") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = read_pem(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InputError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 key")
    if Path(path).stat().st_mode & 0o077:
        log.warning("%s: the signing key is readable by other users; chmod 600 it", path)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = read_pem(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise InputError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{path}: not an Ed25519 key")
    return key


class Signer:
    """Signs documents with one private key; ``certificate`` (the key's certificate
    envelope bytes, see :mod:`slimfleet.agent.keyring`) is attached to every envelope."""

    def __init__(self, private_key: Ed25519PrivateKey, certificate: bytes | None = None) -> None:
        self._key = private_key
        self.key_id = key_id(private_key.public_key())
        self._certificate = json.loads(certificate) if certificate is not None else None

    def sign(self, document: dict[str, Any]) -> bytes:
        """Return the envelope bytes for ``document`` (which must carry this key_id)."""
        if document.get("key_id") != self.key_id:
            raise ValueError("document key_id does not match the signing key")
        signature = self._key.sign(canonical_json(document))
        envelope: dict[str, Any] = {
            "signed": document,
            "signature": base64.b64encode(signature).decode(),
        }
        if self._certificate is not None:
            envelope["certificate"] = self._certificate
        return json.dumps(envelope, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def open_envelope(payload: bytes, what: str) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """``(document, signature, envelope)`` of an envelope, unverified; VerifyError if it
    is not one."""
    try:
        envelope = loads_json(payload)
        document = envelope["signed"]
        signature = base64.b64decode(envelope["signature"], validate=True)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error):
        raise VerifyError(f"{what}: not a signed envelope") from None
    if not isinstance(document, dict):
        raise VerifyError(f"{what}: signed part is not a JSON object")
    return document, signature, envelope


def check_signature(
    key: Ed25519PublicKey, signature: bytes, document: dict[str, Any], what: str
) -> None:
    try:
        key.verify(signature, canonical_json(document))
    except InvalidSignature:
        raise VerifyError(f"{what}: bad signature") from None
    except ValueError:  # NaN or Infinity: no canonical form, so nothing was signed
        raise VerifyError(f"{what}: not canonical JSON") from None


class Verifier:
    """Checks envelopes against pinned public keys."""

    def __init__(self, public_keys: list[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in public_keys}

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, payload: bytes, what: str) -> dict[str, Any]:
        """Return the signed document or raise VerifyError saying why it was refused."""
        document, signature, _ = open_envelope(payload, what)
        kid = document.get("key_id")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise VerifyError(f"{what}: signed by unknown key {kid!r}")
        check_signature(key, signature, document, what)
        return document
