"""Creating the fleet's Ed25519 signing key pair."""

from __future__ import annotations

from pathlib import Path

from slimfleet.agent.errors import InputError
from slimfleet.agent.signing import generate_keypair


def generate_keys(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (private key mode 0600) and return its key id.

    Refuses to overwrite either file: losing a private key means re-keying every device.
    """
    for path in (private_path, public_path):
        if path.exists():
            raise InputError(f"{path} already exists; refusing to overwrite a signing key")
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
