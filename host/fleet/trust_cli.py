"""``slimfleet acl | certs | verify``: broker identities and checking what the broker holds."""

from __future__ import annotations

from pathlib import Path

import click

from slimfleet.agent.errors import InputError
from slimfleet.host.fleet.acl import TlsFiles, require_identities, write_acl_bundle
from slimfleet.host.fleet.certs import BROKER_NAME, CA_NAME, DEFAULT_DAYS, MAX_DAYS, issue_certs
from slimfleet.host.fleet.cli import PORT, _emit, fleet_option, json_option, model_ref_argument
from slimfleet.host.fleet.config import load_fleet
from slimfleet.host.fleet.verify import verify_published


@click.command()
@fleet_option
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the files [default: 'mosquitto' next to the fleet file].",
)
@click.option(
    "--device-port", type=PORT, default=8883, show_default=True, help="Devices, monitors."
)
@click.option("--host-port", type=PORT, default=8884, show_default=True, help="The host role only.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--tls/--no-tls",
    default=True,
    show_default=True,
    help="Mutual TLS with the certificates of 'slimfleet certs' (--no-tls: passwords only, "
    "for a broker behind a TLS proxy or a test on loopback).",
)
@json_option
def acl(
    fleet_path: Path,
    out: Path | None,
    device_port: int,
    host_port: int,
    bind: str,
    tls: bool,
    as_json: bool,
) -> None:
    """Write mosquitto's ACL, password files and mosquitto.conf from the fleet file.

    Each device may read only its own desired state, the models and the keys, and
    write only its own state, status, telemetry and events; host users publish
    everything; monitors only read. Passwords are generated into the identities'
    secrets folder (mode 0600) when missing and never printed. Exit 2 on bad input.
    """
    fleet = load_fleet(fleet_path)
    identities = require_identities(fleet)
    tls_files = None
    if tls:
        certs = identities.certs
        tls_files = TlsFiles(
            certs / f"{CA_NAME}.pem", certs / f"{BROKER_NAME}.pem", certs / f"{BROKER_NAME}.key"
        )
        for path in (tls_files.ca, tls_files.cert, tls_files.key):
            if not path.is_file():
                raise InputError(f"{path} is missing: run 'slimfleet certs' first (or --no-tls)")
    bundle = write_acl_bundle(
        fleet,
        out or fleet.path.parent / "mosquitto",
        device_port=device_port,
        host_port=host_port,
        bind=bind,
        tls=tls_files,
    )
    text = (
        f"wrote {', '.join(bundle.files)} to {bundle.out} for {len(bundle.users)} users "
        f"({len(bundle.new_passwords)} new passwords in {identities.secrets}); "
        f"run: mosquitto -c {bundle.out / 'mosquitto.conf'}"
    )
    _emit(as_json, bundle.to_dict(), text)


@click.command()
@fleet_option
@click.option(
    "--broker-host",
    "broker_hosts",
    multiple=True,
    required=True,
    help="A name or address clients use to reach the broker (repeatable).",
)
@click.option(
    "--days",
    type=click.IntRange(1, MAX_DAYS),
    default=DEFAULT_DAYS,
    show_default=True,
    help="Validity of new certs.",
)
@json_option
def certs(fleet_path: Path, broker_hosts: tuple[str, ...], days: int, as_json: bool) -> None:
    """Make the fleet CA, the broker's certificate and a client certificate per identity.

    Written to the identities' certs folder; keys with mode 0600. Existing files are
    kept, so it only issues what is missing (new devices).
    """
    fleet = load_fleet(fleet_path)
    identities = require_identities(fleet)
    users = [*fleet.devices, *identities.hosts, *identities.monitors]
    result = issue_certs(identities.certs, users, list(broker_hosts), days=days)
    text = (
        f"issued {len(result.issued)} certificate(s), kept {len(result.kept)}, in "
        f"{result.folder}; keep ca.key offline"
    )
    _emit(as_json, result.to_dict(), text)


@click.command()
@click.argument("model", callback=model_ref_argument, metavar="NAME@VERSION")
@click.option(
    "--file",
    "local",
    type=click.Path(exists=True, path_type=Path),
    help="The OUTDIR or .onnx that was published, to compare byte for byte.",
)
@fleet_option
@json_option
def verify(model: tuple[str, int], local: Path | None, fleet_path: Path, as_json: bool) -> None:
    """Check what the broker holds for NAME@VERSION: signature, every chunk, the file.

    Prints one line per problem. Exit 0 when all is well, 1 when something is wrong
    ('slimfleet publish --repair' re-sends it), 2 on bad input.
    """
    name, version = model
    report = verify_published(load_fleet(fleet_path), name, version, local)
    if as_json:
        _emit(True, report.to_dict(), "")
    else:
        for problem in report.problems:
            click.echo(f"{name}@{version}: {problem}")
        if report.ok:
            click.echo(f"{name}@{version}: manifest and {report.chunks} chunk(s) verified")
    if not report.ok:
        raise click.exceptions.Exit(1)
