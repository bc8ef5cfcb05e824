"""Root-certified signing keys and the revocation list, as a device checks them."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.errors import ConfigError, VerifyError
from slimfleet.agent.keyring import (
    CLOCK_SKEW_S,
    MAX_REVOKED,
    KeyRing,
    issue_certificate,
    issue_revocations,
    revocation_topic,
)
from slimfleet.agent.signing import Signer, generate_keypair, key_id, load_private_key

NOW = time.time()
DAY = 86400.0


def certified(
    root: Ed25519PrivateKey, *, lifetime: float = DAY, start: float = NOW, purpose=None
) -> Signer:
    key = Ed25519PrivateKey.generate()
    cert = issue_certificate(
        root, key.public_key(), not_before=start, expires=start + lifetime, purpose=purpose
    )
    return Signer(key, cert)


def doc_for(signer: Signer, **extra) -> dict:
    return {"key_id": signer.key_id, "kind": "desired", **extra}


def edit(payload: bytes, change) -> bytes:
    envelope = json.loads(payload)
    change(envelope)
    return json.dumps(envelope).encode()


@pytest.fixture
def root() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def ring(root) -> KeyRing:
    return KeyRing([root.public_key()])


def test_rotation_needs_no_agent_config_change(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "root.key", tmp_path / "root.pub")
    root = load_private_key(tmp_path / "root.key")
    (tmp_path / "agent.yaml").write_text(
        "device_id: cam-01\nbroker: mqtt://127.0.0.1:1883\nprefix: p\n"
        "keys: {root: root.pub}\nstore_dir: store\n"
    )
    config = load_agent_config(tmp_path / "agent.yaml")
    assert config.root_key_files == (tmp_path / "root.pub",) and config.public_keys == ()
    device = config.verifier()
    old, new = certified(root), certified(root)
    assert old.key_id != new.key_id
    for signer in (old, new):  # the new key is trusted through the certificate it carries
        document = doc_for(signer, seq=1)
        assert device.verify(signer.sign(document), "desired") == document
    assert device.key_ids == [key_id(root.public_key())]


def test_agent_config_needs_a_root_or_pinned_keys(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text(
        "device_id: cam-01\nbroker: mqtt://127.0.0.1:1883\nprefix: p\nstore_dir: s\n"
    )
    with pytest.raises(ConfigError, match="set keys: {root:"):
        load_agent_config(tmp_path / "agent.yaml")
    (tmp_path / "agent.yaml").write_text(
        "device_id: cam-01\nbroker: mqtt://127.0.0.1:1883\nprefix: p\nstore_dir: s\n"
        "keys:\n  root: nope.pub\n"
    )
    with pytest.raises(ConfigError, match=r"agent.yaml:6: keys.root.*does not exist"):
        load_agent_config(tmp_path / "agent.yaml")


def test_agent_config_takes_a_list_of_roots_beside_pinned_keys(tmp_path: Path) -> None:
    ids = [generate_keypair(tmp_path / f"{n}.key", tmp_path / f"{n}.pub") for n in "abc"]
    (tmp_path / "agent.yaml").write_text(
        "device_id: cam-01\nbroker: mqtt://127.0.0.1:1883\nprefix: p\nstore_dir: s\n"
        "keys:\n  root: [a.pub, b.pub]\npublic_keys: [c.pub]\n"
    )
    config = load_agent_config(tmp_path / "agent.yaml")
    assert len(config.root_keys) == 2 and len(config.public_keys) == 1
    assert config.verifier().key_ids == sorted(ids)
    (tmp_path / "agent.yaml").write_text(
        "device_id: cam-01\nbroker: mqtt://127.0.0.1:1883\nprefix: p\nstore_dir: s\n"
        "keys:\n  root: a.pub\n  roots: b.pub\n"
    )
    with pytest.raises(
        ConfigError, match=r"agent.yaml:7: keys.roots: unknown key 'roots' \(allowed: root\)"
    ):
        load_agent_config(tmp_path / "agent.yaml")


def test_an_expired_certificate_is_refused_unless_rechecking_an_installed_model(root, ring):
    signer = certified(root, start=NOW - 2 * DAY, lifetime=DAY)
    payload = signer.sign(doc_for(signer))
    with pytest.raises(VerifyError, match=rf"certificate of key {signer.key_id} expired"):
        ring.verify(payload, "manifest")
    assert ring.verify(payload, "manifest", allow_expired=True)["key_id"] == signer.key_id


def test_a_certificate_from_the_future_is_refused_beyond_the_clock_skew(root, ring):
    now = time.time()  # not the module's NOW: the suite may have run for minutes since
    late = certified(root, start=now + CLOCK_SKEW_S + 60)
    with pytest.raises(VerifyError, match="not valid before"):
        ring.verify(late.sign(doc_for(late)), "desired")
    soon = certified(root, start=now + CLOCK_SKEW_S / 2)  # a device clock a bit behind
    assert ring.verify(soon.sign(doc_for(soon)), "desired")


def test_a_certificate_signed_by_another_key_is_refused(root, ring):
    impostor = certified(Ed25519PrivateKey.generate())
    with pytest.raises(VerifyError, match="desired: certificate: signed by unknown key"):
        ring.verify(impostor.sign(doc_for(impostor)), "desired")


def test_the_root_itself_cannot_sign_models(root, ring):
    signer = Signer(root)
    with pytest.raises(VerifyError, match="with no certificate"):
        ring.verify(signer.sign(doc_for(signer)), "manifest")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda env: env["certificate"]["signed"].update(expires=NOW + 100 * 365 * DAY),
        lambda env: env["certificate"]["signed"].update(purpose="anything"),
        lambda env: env["certificate"].update(signature=base64.b64encode(b"x" * 64).decode()),
    ],
    ids=["expiry", "purpose", "signature"],
)
def test_a_tampered_certificate_is_refused(root, ring, tamper):
    signer = certified(root)
    payload = edit(signer.sign(doc_for(signer)), tamper)
    with pytest.raises(VerifyError, match="certificate: bad signature"):
        ring.verify(payload, "manifest")


def test_a_certificate_for_another_key_or_with_a_swapped_public_key_is_refused(root, ring):
    signer, other = certified(root), certified(root)
    borrowed = edit(
        other.sign(doc_for(other)),
        lambda env: env.update(certificate=json.loads(signer.sign(doc_for(signer)))["certificate"]),
    )
    with pytest.raises(VerifyError, match=f"certificate is for key {signer.key_id}"):
        ring.verify(borrowed, "manifest")
    # a certificate whose public key is not its subject (re-signed so only that check fails)
    forged_doc = json.loads(signer.sign(doc_for(signer)))["certificate"]["signed"]
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    forged_doc["public_key"] = base64.b64encode(raw).decode()
    forged = json.loads(Signer(root).sign(forged_doc))
    payload = edit(signer.sign(doc_for(signer)), lambda env: env.update(certificate=forged))
    with pytest.raises(VerifyError, match="is not the id of its public key"):
        ring.verify(payload, "manifest")


def test_a_bad_document_signature_under_a_good_certificate_is_refused(root, ring):
    signer = certified(root)
    payload = edit(signer.sign(doc_for(signer, seq=1)), lambda env: env["signed"].update(seq=2))
    with pytest.raises(VerifyError, match="manifest: bad signature"):
        ring.verify(payload, "manifest")


def test_a_certificate_purpose_restricts_what_it_may_sign(root, ring):
    signer = certified(root, purpose="models")
    payload = signer.sign(doc_for(signer))
    assert ring.verify(payload, "m", purpose="models")
    assert ring.verify(payload, "m")  # the caller did not ask
    with pytest.raises(VerifyError, match="certified for 'models' only"):
        ring.verify(payload, "d", purpose="desired")


def test_a_revoked_key_is_refused_and_reported_once(root, ring):
    signer, other = certified(root), certified(root)
    payload = signer.sign(doc_for(signer))
    assert ring.verify(payload, "manifest")
    revocations = issue_revocations(root, 1, [signer.key_id], NOW)
    assert ring.apply_revocations(revocations) == {signer.key_id}
    assert ring.apply_revocations(revocations) == set()  # redelivered retained copy
    with pytest.raises(VerifyError, match=f"signed by revoked key {signer.key_id}"):
        ring.verify(payload, "manifest")
    with pytest.raises(VerifyError, match="revoked"):
        ring.verify(payload, "manifest", allow_expired=True)
    with pytest.raises(VerifyError, match=f"c: certificate: key {signer.key_id} is revoked"):
        ring.certificate(json.loads(payload)["certificate"], "c")
    assert ring.verify(other.sign(doc_for(other)), "manifest")
    assert ring.apply_revocations(
        issue_revocations(root, 2, [signer.key_id, other.key_id], NOW)
    ) == {other.key_id}


def test_an_older_revocation_list_never_replaces_a_newer_one(root, ring, tmp_path: Path):
    signer = certified(root)
    old = issue_revocations(root, 1, [], NOW)
    new = issue_revocations(root, 2, [signer.key_id], NOW)
    saved = tmp_path / "revoked.json"
    device = KeyRing([root.public_key()], revocations_path=saved)
    device.apply_revocations(new)
    with pytest.raises(VerifyError, match="seq 1 is older than the current 2"):
        device.apply_revocations(old)
    with pytest.raises(VerifyError, match="different list with the same seq"):
        device.apply_revocations(issue_revocations(root, 2, [], NOW))
    assert device.revoked == {signer.key_id} and device.to_bytes() == new
    # persisted: a restarted device still refuses the old list and the revoked key
    restarted = KeyRing([root.public_key()], revocations_path=saved)
    assert restarted.revocation_seq == 2 and restarted.is_revoked(signer.key_id)
    with pytest.raises(VerifyError, match="older"):
        restarted.apply_revocations(old)


def test_revocation_lists_must_be_signed_by_the_root_and_well_formed(root, ring, tmp_path):
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(VerifyError, match="signed by unknown key"):
        ring.apply_revocations(issue_revocations(stranger, 9, ["0" * 16], NOW))
    signer = certified(root)
    with pytest.raises(VerifyError, match="not a revocation list"):  # a certificate is not one
        ring.apply_revocations(
            json.dumps(json.loads(signer.sign(doc_for(signer)))["certificate"]).encode()
        )
    for seq, revoked, message in [
        (0, [], "seq must be an integer >= 1"),
        (1, ["ZZ"], "not a key id"),
        (1, [f"{i:016x}" for i in range(MAX_REVOKED + 1)], f"at most {MAX_REVOKED}"),
    ]:
        doc = {"kind": "revocation-list", "key_id": key_id(root.public_key()), "seq": seq}
        doc.update(issued=NOW, revoked=revoked)
        with pytest.raises(VerifyError, match=message):
            ring.apply_revocations(Signer(root).sign(doc))
    assert ring.revocation_seq == 0
    # a corrupt saved list is ignored with a warning, not fatal
    (tmp_path / "revoked.json").write_text("{not json")
    assert KeyRing([root.public_key()], revocations_path=tmp_path / "revoked.json").revoked == set()


def test_pinned_keys_still_work_and_can_be_revoked(root, tmp_path: Path):
    legacy = Ed25519PrivateKey.generate()
    device = KeyRing([root.public_key()], [legacy.public_key()])
    signer = Signer(legacy)
    payload = signer.sign(doc_for(signer))
    assert device.verify(payload, "desired")["key_id"] == signer.key_id
    device.apply_revocations(issue_revocations(root, 1, [signer.key_id], NOW))
    with pytest.raises(VerifyError, match="revoked"):
        device.verify(payload, "desired")
    with pytest.raises(ValueError, match="at least one"):
        KeyRing()


def test_revocation_topic():
    assert revocation_topic("slimfleet/demo/") == "slimfleet/demo/keys/revoked"
