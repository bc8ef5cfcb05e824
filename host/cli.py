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
    "keys": ("slimfleet.host.fleet.keys_cli", "keys", "Manage root and signing keys."),
    "publish": ("slimfleet.host.fleet.cli", "publish", "Sign and publish a model."),
    "assign": ("slimfleet.host.fleet.deploy_cli", "assign", "Set what devices run; wait."),
    "unassign": ("slimfleet.host.fleet.deploy_cli", "unassign", "Empty or previous deployment."),
    "reissue": ("slimfleet.host.fleet.deploy_cli", "reissue", "Re-sign desired states."),
    "prune": ("slimfleet.host.fleet.deploy_cli", "prune", "Remove a published version."),
    "rollout": ("slimfleet.host.fleet.rollout_cli", "rollout", "Staged rollout; status/abort."),
    "broker": ("slimfleet.host.fleet.cli", "broker", "Run an embedded MQTT broker."),
    "acl": ("slimfleet.host.fleet.trust_cli", "acl", "Write the broker's ACL and passwords."),
    "certs": ("slimfleet.host.fleet.trust_cli", "certs", "Make the CA and client certificates."),
    "verify": ("slimfleet.host.fleet.trust_cli", "verify", "Check a version on the broker."),
    "chain": ("slimfleet.host.chaincal", "chain", "Calibrate fallback-chain gates."),
    "status": ("slimfleet.host.fleet.observe_cli", "status", "One row per device of the fleet."),
    "events": ("slimfleet.host.fleet.observe_cli", "events", "Print device events."),
    "models": ("slimfleet.host.fleet.observe_cli", "models", "List published models."),
    "monitor": ("slimfleet.host.fleet.observe_cli", "monitor", "Watch the fleet live."),
    "exporter": ("slimfleet.host.fleet.observe_cli", "exporter", "Serve Prometheus metrics."),
    "demo": ("slimfleet.host.demo", "demo", "Pipeline, swap, chain, rollouts: end to end."),
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
            if exc.name in ("onnx", "onnxsim", "pluggy", "amqtt", "rich"):
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
    70 internal error, 130 interrupted, 143 terminated (compress).
    """
    setup_logging(verbose, quiet)


def main() -> None:
    run_cli(cli, "slimfleet")
