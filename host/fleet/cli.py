"""``slimfleet publish | broker``: thin click layers over the fleet library.

``slimfleet keys`` lives in :mod:`slimfleet.host.fleet.keys_cli`; ``assign`` and the other
commands that change desired states in :mod:`slimfleet.host.fleet.deploy_cli`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import click

from slimfleet.agent.wire import DEFAULT_CHUNK_SIZE
from slimfleet.host.fleet.acl import check_host
from slimfleet.host.fleet.broker import DEFAULT_HOST, DEFAULT_PORT, broker_policy, run_broker
from slimfleet.host.fleet.config import BROKER_ENV, DEFAULT_FLEET_FILE, load_fleet
from slimfleet.host.fleet.mqttio import Progress
from slimfleet.host.fleet.publish import publish_model
from slimfleet.host.units import Duration, FiniteFloat

PORT = click.IntRange(1, 65535)
"""The type of a TCP port option."""
MAX_TTL_S = 100 * 365.25 * 86400
"""The longest --ttl: an expiry past it is not a date anyone can read back."""

fleet_option = click.option(
    "--fleet",
    "fleet_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_FLEET_FILE,
    show_default=True,
    help=f"The fleet description; ${BROKER_ENV} overrides its broker URL.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def model_ref_argument(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    """click callback for a ``NAME@VERSION`` argument."""
    name, _, version = value.rpartition("@")
    if not name or not version.isdigit() or int(version) < 1:
        raise click.BadParameter(f"expected NAME@VERSION with VERSION >= 1, got {value!r}")
    return name, int(version)


def _emit(as_json: bool, doc: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(doc, sort_keys=True) if as_json else text)


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Progress]:
    """A progress callback on stderr once the chunk count is known: a bar on a terminal,
    else a line at every tenth of the chunks (``chunks sent: 3/30``) and at the last."""
    with ExitStack() as stack:
        bar: Any = None
        shown = 0  # the tenth last printed, off a terminal

        def update(done: int, total: int) -> None:
            nonlocal bar, shown
            if not sys.stderr.isatty():
                tenth = 10 * done // max(total, 1)
                if tenth > shown and logging.getLogger("slimfleet").isEnabledFor(logging.WARNING):
                    shown = tenth
                    click.echo(f"chunks sent: {done}/{total}", err=True)
                return
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
@click.option(
    "--ttl",
    "ttl_s",
    type=Duration(MAX_TTL_S, minimum=0.001),
    help="How long until the manifest expires: 90s, 12h, 30d or seconds (at most 100 years).",
)
@click.option(
    "--max-latency-ms",
    type=FiniteFloat(min=0, min_open=True),
    help="Smoke-test latency budget on the device.",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Check every retained chunk and the manifest of an existing version and re-send "
    "what is missing or wrong.",
)
@json_option
def publish(
    source: Path,
    name: str,
    version: int,
    fleet_path: Path,
    chunk_size: int,
    ttl_s: float | None,
    max_latency_ms: float | None,
    repair: bool,
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
            repair=repair,
        )
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if result.repaired is not None:
        manifest = "re-sent" if result.repaired["manifest"] else "kept (valid)"
        text = (
            f"repaired {name}@{version}: re-sent chunks {result.repaired['chunks'] or 'none'}, "
            f"manifest {manifest}"
        )
    elif result.published:
        text = (
            f"published {name}@{version}: {result.size} bytes in {result.chunks} chunks, "
            f"sha256 {result.sha256[:16]}, key {result.key_id}, on {fleet.broker.url}"
        )
    else:
        text = (
            f"{name}@{version} is already published with the same bytes: nothing to do "
            "('slimfleet verify' checks the broker's copy, --repair fixes it)"
        )
    _emit(as_json, result.to_dict(), text)


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=PORT,
    help="TCP port.",
)
@click.option(
    "--fleet",
    "fleet_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Admit only this fleet's identities, with their roles [default: fleet.yaml when it "
    "exists and has an 'identities:' section].",
)
def broker(host: str, port: int, fleet_path: Path | None) -> None:
    """Run an embedded MQTT 3.1.1 broker (amqtt) in the foreground; Ctrl-C stops it.

    For a demo or a first try: retained messages (published models) live in memory only.
    Anonymous unless the fleet file names identities (see 'slimfleet acl').
    """
    policy = broker_policy(fleet_path)
    mode = f"{len(policy.hashes)} identities" if policy else "anonymous"
    run_broker(
        check_host(host, "--host"),
        port,
        policy,
        ready=lambda url: click.echo(
            f"embedded MQTT broker listening on {url}, {mode} (Ctrl-C to stop)", err=True
        ),
    )
