"""Keys that rotate and can be revoked: an offline root, signing-key certificates, and a
signed revocation list.

- The fleet's **root** key (Ed25519, kept offline) is the only key devices pin
  (agent.yaml ``keys: root:``). It signs nothing but certificates and revocation lists.
- A **certificate** is an envelope signed by the root whose document is::

      {"kind": "signing-key-certificate", "key_id": <root key id>, "subject": <key id>,
       "public_key": <base64 raw Ed25519>, "not_before": <unix s>, "expires": <unix s>,
       "purpose": <str or null>}

  Every manifest and desired state carries its signing key's certificate
  (``"certificate"`` next to ``"signed"``), so a new signing key needs no device change.
- The **revocation list** is an envelope signed by the root, published retained on
  ``<prefix>/keys/revoked`` (:func:`revocation_topic`)::

      {"kind": "revocation-list", "key_id": <root key id>, "seq": <int >= 1>,
       "issued": <unix s>, "revoked": [<key id>, ...]}

  A list replaces the current one only if its ``seq`` is higher: an old list replayed
  by an attacker cannot un-revoke a key.

The daemon: ``ring = config.verifier(store_dir / "revoked.json")``; verify manifests and
desired states with ``ring.verify(payload, what)`` (stored ones with
``allow_expired=True``); subscribe to :func:`revocation_topic` with
``max_bytes=inbox.DOCUMENT_LIMIT`` and feed each message to
``ring.apply_revocations(payload, topic)``; for the key ids it returns, fall back off
models signed by them (``Manifest.key_id``) with a ``key_revoked`` event.

Bounds: a revocation list names at most :data:`MAX_REVOKED` keys (its message is at most
``inbox.DOCUMENT_LIMIT`` bytes); a certificate's ``not_before`` may be at most
:data:`CLOCK_SKEW_S` seconds in the device's future.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from slimfleet.agent.errors import KeyRevoked, VerifyError
from slimfleet.agent.signing import (
    Signer,
    Verifier,
    check_signature,
    key_id,
    open_envelope,
    read_trust_file,
)

log = logging.getLogger(__name__)

CERT_KIND = "signing-key-certificate"
REVOCATION_KIND = "revocation-list"
REVOCATION_LEAF = "keys/revoked"
MAX_REVOKED = 1000
CLOCK_SKEW_S = 300.0
KEY_ID = re.compile(r"[0-9a-f]{16}")


def revocation_topic(prefix: str) -> str:
    """The retained topic of the fleet's revocation list."""
    return f"{prefix.strip('/')}/{REVOCATION_LEAF}"


def _number(doc: dict[str, Any], key: str, what: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise VerifyError(f"{what}: {key} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Certificate:
    """A root-signed statement: ``public_key`` (id ``key_id``) may sign between
    ``not_before`` and ``expires`` (unix seconds), for ``purpose`` if set."""

    key_id: str
    public_key: Ed25519PublicKey
    not_before: float
    expires: float
    purpose: str | None
    root_key_id: str

    def to_dict(self) -> dict[str, Any]:
        raw = self.public_key.public_bytes_raw()
        return {
            "kind": CERT_KIND,
            "key_id": self.root_key_id,
            "subject": self.key_id,
            "public_key": base64.b64encode(raw).decode(),
            "not_before": self.not_before,
            "expires": self.expires,
            "purpose": self.purpose,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], what: str) -> Certificate:
        """Parse a certificate document (its signature is checked elsewhere)."""
        if doc.get("kind") != CERT_KIND:
            raise VerifyError(f"{what}: not a signing-key certificate")
        try:
            raw = base64.b64decode(doc["public_key"], validate=True)
            public = Ed25519PublicKey.from_public_bytes(raw)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise VerifyError(f"{what}: public_key is not a base64 Ed25519 key") from None
        subject, purpose = doc.get("subject"), doc.get("purpose")
        if subject != key_id(public):
            raise VerifyError(f"{what}: subject {subject!r} is not the id of its public key")
        if purpose is not None and not isinstance(purpose, str):
            raise VerifyError(f"{what}: purpose must be a string or null")
        not_before, expires = _number(doc, "not_before", what), _number(doc, "expires", what)
        if expires <= not_before:
            raise VerifyError(f"{what}: expires before it becomes valid")
        return cls(subject, public, not_before, expires, purpose, str(doc["key_id"]))

    def problem(self, now: float, *, allow_expired: bool = False) -> str | None:
        """Why the certificate is not valid at ``now``, or None."""
        if now + CLOCK_SKEW_S < self.not_before:
            return f"certificate of key {self.key_id} is not valid before {self.not_before:.0f}"
        if not allow_expired and now >= self.expires:
            return f"certificate of key {self.key_id} expired at {self.expires:.0f}"
        return None


def issue_certificate(
    root: Ed25519PrivateKey,
    public: Ed25519PublicKey,
    *,
    not_before: float,
    expires: float,
    purpose: str | None = None,
) -> bytes:
    """The certificate envelope for ``public``, signed by ``root``."""
    root_id = key_id(root.public_key())
    cert = Certificate(key_id(public), public, not_before, expires, purpose, root_id)
    return Signer(root).sign(cert.to_dict())


@dataclass(frozen=True)
class RevocationList:
    """The root's list of revoked signing key ids; a higher ``seq`` replaces a lower."""

    seq: int
    issued: float
    revoked: frozenset[str]
    root_key_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": REVOCATION_KIND,
            "key_id": self.root_key_id,
            "seq": self.seq,
            "issued": self.issued,
            "revoked": sorted(self.revoked),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], what: str) -> RevocationList:
        if doc.get("kind") != REVOCATION_KIND:
            raise VerifyError(f"{what}: not a revocation list")
        seq, revoked = doc.get("seq"), doc.get("revoked")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise VerifyError(f"{what}: seq must be an integer >= 1, got {seq!r}")
        if not isinstance(revoked, list) or len(revoked) > MAX_REVOKED:
            raise VerifyError(f"{what}: revoked must be a list of at most {MAX_REVOKED} key ids")
        if not all(isinstance(k, str) and KEY_ID.fullmatch(k) for k in revoked):
            raise VerifyError(f"{what}: revoked holds something that is not a key id")
        issued = _number(doc, "issued", what)
        return cls(seq, issued, frozenset(revoked), str(doc["key_id"]))


def issue_revocations(
    root: Ed25519PrivateKey, seq: int, revoked: Iterable[str], issued: float
) -> bytes:
    """The revocation list envelope, signed by ``root``."""
    doc = RevocationList(seq, issued, frozenset(revoked), key_id(root.public_key()))
    return Signer(root).sign(doc.to_dict())


class KeyRing:
    """What a device trusts: root keys (via certificates), optionally plain pinned
    signing keys (agent.yaml ``public_keys``, for compatibility), minus revoked keys.

    ``verify`` is call-compatible with :meth:`Verifier.verify`. With
    ``revocations_path`` the current revocation list (its signed bytes) is read at start
    and written atomically whenever a newer one is applied; a file that does not verify
    is ignored with a warning (the retained list on the broker restores it).
    """

    def __init__(
        self,
        roots: Iterable[Ed25519PublicKey] = (),
        pinned: Iterable[Ed25519PublicKey] = (),
        *,
        revocations_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._roots = Verifier(list(roots))
        self._pinned = {key_id(k): k for k in pinned}
        if not self._roots.key_ids and not self._pinned:
            raise ValueError("a key ring needs at least one root or pinned key")
        self.clock = clock
        self.revocations_path = revocations_path
        # Guards _revocations and _revocations_payload (daemon and link threads).
        self._lock = threading.Lock()
        self._revocations: RevocationList | None = None
        self._revocations_payload: bytes | None = None
        if revocations_path is not None and revocations_path.exists():
            try:
                self.apply_revocations(read_trust_file(revocations_path), str(revocations_path))
            except (OSError, ValueError, VerifyError) as exc:
                log.warning("ignored the saved revocation list: %s", exc)

    @property
    def key_ids(self) -> list[str]:
        """Root and pinned key ids."""
        return sorted([*self._roots.key_ids, *self._pinned])

    @property
    def revoked(self) -> frozenset[str]:
        with self._lock:
            return self._revocations.revoked if self._revocations else frozenset()

    @property
    def revocation_seq(self) -> int:
        """The seq of the current revocation list, 0 if none."""
        with self._lock:
            return self._revocations.seq if self._revocations else 0

    def to_bytes(self) -> bytes | None:
        """The current revocation list's signed bytes (feed them to apply_revocations)."""
        with self._lock:
            return self._revocations_payload

    def is_revoked(self, kid: str) -> bool:
        return kid in self.revoked

    def certificate(self, cert: Any, what: str, *, allow_expired: bool = False) -> Certificate:
        """Check a certificate (envelope bytes or its parsed JSON object) against the roots,
        the clock and the revocation list; VerifyError says why it is refused."""
        payload = cert if isinstance(cert, bytes) else json.dumps(cert).encode()
        what = f"{what}: certificate"
        parsed = Certificate.from_dict(self._roots.verify(payload, what), what)
        problem = parsed.problem(self.clock(), allow_expired=allow_expired)
        if problem is None and self.is_revoked(parsed.key_id):
            problem = f"key {parsed.key_id} is revoked"
        if problem is not None:
            raise VerifyError(f"{what}: {problem}")
        return parsed

    def verify(
        self,
        payload: bytes,
        what: str,
        *,
        allow_expired: bool = False,
        purpose: str | None = None,
    ) -> dict[str, Any]:
        """The signed document, or VerifyError saying why it was refused: a revoked key;
        neither pinned nor certified by a root; a certificate expired (unless
        ``allow_expired``: for re-checking a model installed while it was valid), not yet
        valid, for another ``purpose``, or not root-signed; a bad signature."""
        document, signature, envelope = open_envelope(payload, what)
        kid = document.get("key_id")
        if not isinstance(kid, str):
            raise VerifyError(f"{what}: key_id is missing")
        if self.is_revoked(kid):
            raise KeyRevoked(f"{what}: signed by revoked key {kid}")
        key = self._pinned.get(kid)
        if key is None:
            if "certificate" not in envelope:
                raise VerifyError(f"{what}: signed by unknown key {kid!r} with no certificate")
            cert = self.certificate(envelope["certificate"], what, allow_expired=allow_expired)
            if cert.key_id != kid:
                raise VerifyError(f"{what}: the certificate is for key {cert.key_id}, not {kid}")
            if purpose is not None and cert.purpose not in (None, purpose):
                raise VerifyError(f"{what}: key {kid} is certified for {cert.purpose!r} only")
            key = cert.public_key
        check_signature(key, signature, document, what)
        return document

    def apply_revocations(self, payload: bytes, what: str = "revocation list") -> set[str]:
        """Adopt a newer root-signed revocation list; return the key ids it newly revokes.

        The same list again is a no-op (empty set). VerifyError if it does not verify, is
        older than the current one, or has the current seq with different content.
        """
        parsed = RevocationList.from_dict(self._roots.verify(payload, what), what)
        with self._lock:
            current = self._revocations
            if current is not None:
                if parsed.seq < current.seq:
                    raise VerifyError(
                        f"{what}: seq {parsed.seq} is older than the current {current.seq}"
                    )
                if parsed.seq == current.seq:
                    if parsed.revoked != current.revoked:
                        raise VerifyError(f"{what}: a different list with the same seq")
                    return set()
            self._revocations, self._revocations_payload = parsed, payload
            newly = set(parsed.revoked - (current.revoked if current else frozenset()))
            if self.revocations_path is not None:
                _write_atomic(self.revocations_path, payload)
        log.info("revocation list %d applied: %d key(s) revoked", parsed.seq, len(parsed.revoked))
        return newly


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot save the revocation list to %s: %s", path, exc)
