"""``slimfleet keys | publish | broker``: thin click layers over the fleet library."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from slimfleet.agent.wire import DEFAULT_CHUNK_SIZE
from slimfleet.host.fleet.broker import DEFAULT_HOST, DEFAULT_PORT, run_broker
from slimfleet.host.fleet.config import BROKER_ENV, DEFAULT_FLEET_FILE, load_fleet
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.mqttio import Progress
from slimfleet.host.fleet.publish import publish_model

fleet_option = click.option(
    "--fleet",
    "fleet_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_FLEET_FILE,
    show_default=True,
    help=f"The fleet description; ${BROKER_ENV} overrides its broker URL.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _emit(as_json: bool, doc: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(doc, sort_keys=True) if as_json else text)


@click.group()
def keys() -> None:
    """Manage the fleet's Ed25519 signing key."""


@keys.command("generate")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write signing.key and signing.pub into this directory instead of the paths "
    "named in the fleet file.",
)
@fleet_option
@json_option
def keys_generate(out: Path | None, fleet_path: Path, as_json: bool) -> None:
    """Create a new signing key pair; the private key is written with mode 0600.

    Never overwrites an existing key. Copy the public key to every device.
    """
    if out is not None:
        private, public = out / "signing.key", out / "signing.pub"
    else:
        fleet = load_fleet(fleet_path)
        private, public = fleet.private_key, fleet.public_key
    kid = generate_keys(private, public)
    doc = {"key_id": kid, "private_key": str(private), "public_key": str(public)}
    _emit(as_json, doc, f"key {kid}: private {private} (keep secret), public {public}")


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Progress]:
    """A progress callback drawing a bar on stderr once the chunk count is known."""
    with ExitStack() as stack:
        bar: Any = None

        def update(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(
                    click.progressbar(length=total, label="chunks", file=sys.stderr)
                )
            bar.update(done - bar.pos)

        yield update if enabled else (lambda done, total: None)


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path), metavar="OUTDIR|MODEL")
@click.option(
    "--name",
    required=True,
    help="Model name: letters, digits, '_', '.', '-' (no leading '.' or '-').",
)
@click.option("--version", "version", type=int, required=True, help="Version, an integer >= 1.")
@fleet_option
@click.option(
    "--chunk-size",
    type=int,
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Bytes per chunk message.",
)
@click.option("--ttl", "ttl_s", type=float, help="Seconds until the manifest expires.")
@click.option("--max-latency-ms", type=float, help="Smoke-test latency budget on the device.")
@json_option
def publish(
    source: Path,
    name: str,
    version: int,
    fleet_path: Path,
    chunk_size: int,
    ttl_s: float | None,
    max_latency_ms: float | None,
    as_json: bool,
) -> None:
    """Sign a model and publish it, retained, for devices to fetch.

    OUTDIR is a 'slimfleet compress' output (model.onnx, report.json, sample.npz); a
    bare MODEL gets a random smoke-test input. Re-publishing the same bytes does
    nothing; a version, once published, cannot change.
    """
    fleet = load_fleet(fleet_path)
    with _progress_bar(not as_json) as progress:
        result = publish_model(
            fleet,
            source,
            name,
            version,
            chunk_size=chunk_size,
            ttl_s=ttl_s,
            max_latency_ms=max_latency_ms,
            progress=progress,
        )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.published:
        text = (
            f"published {name}@{version}: {result.size} bytes in {result.chunks} chunks, "
            f"sha256 {result.sha256[:16]}, key {result.key_id}, on {fleet.broker.url}"
        )
    else:
        text = f"{name}@{version} is already published with the same bytes: nothing to do"
    _emit(as_json, result.to_dict(), text)


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="TCP port.")
def broker(host: str, port: int) -> None:
    """Run an embedded MQTT 3.1.1 broker (amqtt) in the foreground; Ctrl-C stops it.

    For a demo or a first try: retained messages (published models) live in memory only.
    """
    click.echo(f"embedded MQTT broker listening on mqtt://{host}:{port} (Ctrl-C to stop)", err=True)
    run_broker(host, port)
