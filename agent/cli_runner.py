"""Running a click command so that expected failures print one line, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from slimfleet.agent.errors import SlimfleetError

DEBUG_ENV = "SLIMFLEET_DEBUG"
EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE: a bug in slimfleet, please report it


def run_cli(command: click.Command, prog_name: str) -> None:
    """Invoke ``command``; map SlimfleetError to its exit code and one line on stderr."""
    try:
        # without standalone mode click *returns* the code of a click.exceptions.Exit
        # (ctx.exit(1), raise Exit(1)) instead of raising it: it is the exit code
        code = command.main(prog_name=prog_name, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool):
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, not click's usage block
        command_path = exc.ctx.command_path if exc.ctx is not None else prog_name
        click.echo(f"error: {exc.format_message()} (see '{command_path} -h')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SlimfleetError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: still one line unless the user asks for more
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        else:
            click.echo(
                f"internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for details)",
                err=True,
            )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream that
    was current when logging was set up (a CLI run in-process, e.g. by click's CliRunner,
    must not leave the root logger writing to its captured, since closed, stream)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # type: ignore[no-untyped-def]
        pass


def setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
