"""``slimfleet-agent --config agent.yaml``: run one agent until SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from slimfleet.agent.cli_runner import setup_logging
from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent
from slimfleet.agent.slots import describe_loaded


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The agent's agent.yaml (see examples/agent.yaml).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only log errors.")
def cli(config_path: Path, verbose: int, quiet: bool) -> None:
    """Run the slimfleet edge agent until SIGTERM or SIGINT.

    Serves the last good deployment at once, follows the device's desired state from
    the fleet's MQTT broker, and reports state, events and telemetry.
    """
    setup_logging(verbose, quiet)
    config = load_agent_config(config_path)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent = Agent(config)
    agent.start()
    try:
        serving = agent.server.current()
        click.echo(
            f"slimfleet-agent {config.device_id}: serving "
            + (describe_loaded(serving) if serving else "nothing yet")
            + (f", HTTP on {agent.http_url}" if agent.http_url else "")
            + f", broker {config.broker.url}",
            err=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        agent.stop()
