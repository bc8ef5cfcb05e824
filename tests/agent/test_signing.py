import json
import re
import stat

import pytest

from slimfleet.agent.errors import InputError, VerifyError
from slimfleet.agent.signing import (
    Signer,
    Verifier,
    generate_keypair,
    load_private_key,
    load_public_key,
)


@pytest.fixture
def keys(tmp_path):
    kid = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    return kid, Signer(load_private_key(tmp_path / "k.pem")), load_public_key(tmp_path / "k.pub")


def test_generate_writes_private_key_0600_and_refuses_overwrite(tmp_path, keys):
    mode = stat.S_IMODE((tmp_path / "k.pem").stat().st_mode)
    assert mode == 0o600
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "k.pem", tmp_path / "k2.pub")


def test_sign_and_verify(keys):
    kid, signer, public = keys
    assert signer.key_id == kid and len(kid) == 16
    doc = {"kind": "desired", "key_id": kid, "version": 2}
    assert Verifier([public]).verify(signer.sign(doc), "desired") == doc


def test_tampered_document_is_refused(keys):
    kid, signer, public = keys
    envelope = json.loads(signer.sign({"key_id": kid, "version": 2}))
    envelope["signed"]["version"] = 3
    with pytest.raises(VerifyError, match="manifest: bad signature"):
        Verifier([public]).verify(json.dumps(envelope).encode(), "manifest")


def test_unknown_key_and_garbage_are_refused(tmp_path, keys):
    kid, signer, _ = keys
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    other = Verifier([load_public_key(tmp_path / "other.pub")])
    with pytest.raises(VerifyError, match="unknown key"):
        other.verify(signer.sign({"key_id": kid}), "manifest")
    for payload in (b"\xff", b"[]", b'{"signed": 1, "signature": "AA=="}', b'{"signed": {}}'):
        with pytest.raises(VerifyError, match="manifest:"):
            other.verify(payload, "manifest")


def test_signer_refuses_document_for_another_key(keys):
    _, signer, _ = keys
    with pytest.raises(ValueError):
        signer.sign({"key_id": "someone-else"})


def test_bad_key_files_are_input_errors(tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(InputError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "junk.pem")
    with pytest.raises(InputError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(InputError, match="cannot read"):
        load_public_key(tmp_path / "missing.pub")


def test_a_signing_key_others_can_read_is_warned_about(tmp_path, caplog):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from slimfleet.agent.signing import load_private_key

    path = tmp_path / "signing.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    load_private_key(path)
    assert "readable by other users" not in caplog.text
    path.chmod(0o644)
    load_private_key(path)
    assert f"{path}: the signing key is readable by other users; chmod 600 it" in caplog.text


def test_a_nan_in_a_signed_document_is_a_refusal_not_a_crash(keys):
    # canonical JSON refuses NaN; the ValueError escaped the verifier's callers
    kid, _, public = keys
    verifier = Verifier([public])
    payload = b'{"signed": {"key_id": "' + kid.encode() + b'", "x": NaN}, "signature": "AAAA"}'
    with pytest.raises(VerifyError, match="desired: not canonical JSON"):
        verifier.verify(payload, "desired")


@pytest.mark.parametrize("source", ["/dev/zero", "big"])
def test_a_key_path_without_an_end_is_refused_unread(tmp_path, source):
    # /dev/zero as --root-key grew to 8.7 GB and ignored Ctrl-C
    from slimfleet.agent.signing import load_public_key

    path = tmp_path / "big.pem" if source == "big" else source
    if source == "big":
        path.write_bytes(b"A" * (65 * 1024))
    reason = "not a regular file" if source == "/dev/zero" else "over 64 KiB"
    with pytest.raises(InputError, match=re.escape(f"not a signing key file ({reason})")):
        load_private_key(path)
    with pytest.raises(InputError, match=re.escape(f"not a public key file ({reason})")):
        load_public_key(path)
