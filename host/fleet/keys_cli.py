"""``slimfleet keys root | generate | revoke | list``: the fleet's keys, from the command line.

Thin click layer over :mod:`slimfleet.host.fleet.keys`; bad input is one line and exit 2
(InputError), an unreachable broker one line and exit 2 as well for ``revoke``.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import click

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.host.fleet.cli import _emit, fleet_option, json_option
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.keys import (
    MAX_CERT_LIFETIME_S,
    generate_keys,
    generate_signing_key,
    list_keys,
    revoke,
)
from slimfleet.host.units import parse_duration

root_key_option = click.option(
    "--root-key",
    "root_key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The root PRIVATE key (keep it offline; it is only read).",
)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def keys() -> None:
    """Manage the fleet's keys: an offline root certifies signing keys and revokes them.

    See the README section "Keys: rotation and revocation".
    """


@keys.command("root")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("keys"),
    show_default=True,
    help="Write root.key (mode 0600) and root.pub into this directory.",
)
@json_option
def keys_root(out: Path, as_json: bool) -> None:
    """Create the fleet's root key pair. Never overwrites an existing key.

    Devices pin root.pub (agent.yaml keys: root:); move root.key offline.
    """
    private, public = out / "root.key", out / "root.pub"
    kid = generate_keys(private, public, "root key")
    doc = {"key_id": kid, "private_key": str(private), "public_key": str(public)}
    _emit(as_json, doc, f"root {kid}: private {private} (move it offline), public {public}")


@keys.command("generate")
@root_key_option
@click.option(
    "--expires",
    default="365d",
    show_default=True,
    help="Certificate lifetime: 365d, 12w, 36h, 90m or seconds (at most ten years).",
)
@click.option("--purpose", help="Restrict the certificate to one purpose (optional).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write signing.key, signing.pub (and signing.cert) into this directory instead "
    "of the paths named in the fleet file.",
)
@fleet_option
@json_option
def keys_generate(
    root_key: Path | None,
    expires: str,
    purpose: str | None,
    out: Path | None,
    fleet_path: Path,
    as_json: bool,
) -> None:
    """Create a signing key pair (private key mode 0600) and, with --root-key, its
    certificate signed by the root. Never overwrites an existing file.

    Without --root-key the key has no certificate: devices must pin it (public_keys).
    """
    # With --out the fleet file is optional: when present, --root-key is checked against it.
    fleet = load_fleet(fleet_path) if out is None or fleet_path.exists() else None
    if out is not None:
        private, public, cert = out / "signing.key", out / "signing.pub", out / "signing.cert"
    elif fleet is not None:
        private, public, cert = fleet.private_key, fleet.public_key, fleet.certificate
    if root_key is None:
        if fleet is not None and fleet.root_key is not None:
            raise InputError(
                f"{fleet_path} names a root key (keys.root): devices trust only keys it "
                "certifies, so pass --root-key"
            )
        kid = generate_keys(private, public)
        doc = {"key_id": kid, "private_key": str(private), "public_key": str(public)}
        _emit(as_json, doc, f"key {kid}: private {private} (keep secret), public {public}")
        return
    if cert is None:
        raise InputError(
            f"{fleet_path}: keys: has no 'certificate:' path for the signing key's certificate"
        )
    lifetime = parse_duration(expires, "--expires", maximum=MAX_CERT_LIFETIME_S)
    made = generate_signing_key(
        private, public, cert, root_key, lifetime_s=lifetime, purpose=purpose, fleet=fleet
    )
    doc = {
        "key_id": made.key_id,
        "private_key": str(private),
        "public_key": str(public),
        "certificate": str(cert),
        "not_before": made.not_before,
        "expires": made.expires,
        "purpose": made.purpose,
    }
    text = f"key {made.key_id}: private {private}, certificate {cert} until {_when(made.expires)}"
    _emit(as_json, doc, text)


@keys.command("revoke")
@click.argument("key_id")
@root_key_option
@fleet_option
@json_option
def keys_revoke(key_id: str, root_key: Path | None, fleet_path: Path, as_json: bool) -> None:
    """Revoke KEY_ID: publish the root-signed revocation list, retained.

    Devices refuse everything signed by the key from then on, and fall back off models
    it signed.
    """
    if root_key is None:
        raise InputError("--root-key is required: revocation lists are signed by the root")
    fleet = load_fleet(fleet_path)
    try:
        done = revoke(fleet, key_id, root_key)
    except SlimfleetError as exc:  # the broker too (unreachable, refused): exit 2
        if isinstance(exc, InputError):
            raise
        raise InputError(str(exc)) from None
    text = (
        f"revoked {key_id}: revocation list {done.seq} ({len(done.revoked)} key(s)) on {done.topic}"
    )
    _emit(as_json, dataclasses.asdict(done), text)


@keys.command("list")
@fleet_option
@json_option
def keys_list(fleet_path: Path, as_json: bool) -> None:
    """The root, the signing key in use and every certificate next to it, with their state."""
    rows = list_keys(load_fleet(fleet_path))
    if as_json:
        _emit(True, {"keys": rows}, "")
        return
    for row in rows:
        when = f" until {_when(row['expires'])}" if "expires" in row else ""
        use = " (in use)" if row.get("in_use") else ""
        state = f" {row['state']}" if "state" in row else ""
        click.echo(f"{row['role']:8} {row.get('key_id', '?'):16}{state}{when}{use}  {row['file']}")
