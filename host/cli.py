"""The ``slimfleet`` command: a thin group whose subcommands are imported on first use.

Lazy imports keep ``slimfleet --help`` fast and let a device that installed only the
base package run fleet commands without onnx, onnxsim or pluggy.
"""

from __future__ import annotations

import importlib

import click

from slimfleet.agent.cli_runner import run_cli, setup_logging
from slimfleet.agent.errors import SlimfleetError

# command name -> (module, attribute, one-line help shown by ``slimfleet --help``)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "compress": ("slimfleet.host.compress.cli", "compress", "Find the best compressed model."),
    "passes": ("slimfleet.host.compress.cli", "passes", "List compression passes."),
    "inspect": ("slimfleet.host.compress.cli", "inspect", "Describe an ONNX model."),
    "keys": ("slimfleet.host.fleet.cli", "keys", "Manage signing keys."),
    "publish": ("slimfleet.host.fleet.cli", "publish", "Sign and publish a model."),
    "assign": ("slimfleet.host.fleet.cli", "assign", "Set the model devices should run."),
    "broker": ("slimfleet.host.fleet.cli", "broker", "Run an embedded MQTT broker."),
    "chain": ("slimfleet.host.chaincal", "chain", "Calibrate fallback-chain gates."),
    "demo": ("slimfleet.host.demo", "demo", "Compress, publish and serve, end to end."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name in ("onnx", "onnxsim", "pluggy", "amqtt"):
                raise SlimfleetError(
                    f"'slimfleet {name}' needs {exc.name}: pip install 'slimfleet[host]'"
                ) from None
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slimfleet")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def cli(verbose: int, quiet: bool) -> None:
    """slimfleet: compress ONNX models by measurement and run them on a fleet.

    Exit codes: 0 success, 1 the operation failed, 2 invalid input or usage,
    70 internal error.
    """
    setup_logging(verbose, quiet)


def main() -> None:
    run_cli(cli, "slimfleet")
