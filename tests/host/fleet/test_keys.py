"""Key generation: mode 0600, never overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimfleet.agent.errors import InputError
from slimfleet.agent.signing import Signer, Verifier, load_private_key, load_public_key
from slimfleet.host.fleet.keys import generate_keys


def test_generate_writes_a_0600_private_key_and_its_public_key(tmp_path: Path) -> None:
    private, public = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    kid = generate_keys(private, public)
    assert private.stat().st_mode & 0o777 == 0o600
    signer = Signer(load_private_key(private))
    assert signer.key_id == kid
    document = {"key_id": kid, "x": 1}
    assert Verifier([load_public_key(public)]).verify(signer.sign(document), "t") == document


@pytest.mark.parametrize("existing", ["signing.key", "signing.pub"])
def test_generate_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists; refusing to overwrite"):
        generate_keys(tmp_path / "signing.key", tmp_path / "signing.pub")
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


def test_unwritable_directory_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot write the key pair"):
        generate_keys(tmp_path / "file" / "signing.key", tmp_path / "file" / "signing.pub")
