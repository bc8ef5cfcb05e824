"""Running a click command so that expected failures print one line, never a traceback."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

import click

from slimfleet.agent.errors import SlimfleetError

DEBUG_ENV = "SLIMFLEET_DEBUG"
EXIT_INTERNAL = 70  # sysexits EX_SOFTWARE: a bug in slimfleet, please report it
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM taken like Ctrl-C (see :func:`interrupt_on_sigterm`): what the command was
    running unwinds, and the processes it started are taken down with it."""


def interrupt_on_sigterm() -> None:
    """Raise :class:`Terminated` in the main thread on SIGTERM (a service stop, ``timeout``
    in CI), where Python's default would end the process at once and leave a child it
    supervises (a compress evaluation worker, which leads its own session) running on with
    no time or memory limit. For commands that supervise children only: an exception
    raised inside paho's lock can hang an MQTT command (see ``host.fleet.stopsignals``)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""click 8.2+ raises it for a bare group (8.1 prints the help and exits itself)."""


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
    except _NO_ARGS_IS_HELP as exc:  # a bare group: its help, as asked
        click.echo(exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, not click's usage block
        command_path = exc.ctx.command_path if exc.ctx is not None else prog_name
        click.echo(f"error: {exc.format_message()} (see '{command_path} -h')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt) as exc:  # click turns Ctrl-C into Abort
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        click.echo("aborted" if isinstance(exc, click.Abort) else "interrupted", err=True)
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
