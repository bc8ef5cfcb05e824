import logging

import click
import pytest

from slimfleet.agent.cli_runner import EXIT_INTERNAL, Terminated, run_cli, setup_logging
from slimfleet.agent.errors import ConfigError, SlimfleetError


def _command(exc: BaseException | None):
    @click.command()
    def cmd() -> None:
        if exc is not None:
            raise exc
        click.echo("fine")

    return cmd


@pytest.mark.parametrize(
    ("exc", "code", "stderr"),
    [
        (None, 0, ""),
        (SlimfleetError("broker unreachable"), 1, "error: broker unreachable\n"),
        (ConfigError("f.yaml:3: bad"), 2, "error: f.yaml:3: bad\n"),
        (KeyboardInterrupt(), 130, "aborted\n"),  # click turns Ctrl-C into Abort
        (Terminated(), 143, "terminated\n"),  # SIGTERM, see interrupt_on_sigterm
        (click.UsageError("no such option"), 2, "error: no such option (see 'prog -h')\n"),
        (click.exceptions.Exit(1), 1, ""),  # raise Exit(1) / ctx.exit(1): was exit 0
        (click.exceptions.Exit(0), 0, ""),
    ],
)
def test_exit_codes_and_one_line(monkeypatch, capsys, exc, code, stderr):
    monkeypatch.setattr("sys.argv", ["prog"])
    with pytest.raises(SystemExit) as info:
        run_cli(_command(exc), "prog")
    assert info.value.code == code
    assert capsys.readouterr().err.endswith(stderr)


def test_bug_is_one_line_unless_debug(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["prog"])
    monkeypatch.delenv("SLIMFLEET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli(_command(ZeroDivisionError("oops")), "prog")
    assert info.value.code == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError: oops" in err
    monkeypatch.setenv("SLIMFLEET_DEBUG", "1")
    with pytest.raises(SystemExit):
        run_cli(_command(ZeroDivisionError("oops")), "prog")
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("verbose", "quiet", "level"), [(0, False, 30), (1, False, 20), (2, False, 10), (0, True, 40)]
)
def test_setup_logging_levels(verbose, quiet, level):
    setup_logging(verbose, quiet)
    assert logging.getLogger().level == level


def test_logging_follows_the_current_stderr(capsys) -> None:
    """A CLI run in-process (CliRunner swaps sys.stderr, then closes it) must not leave
    the root logger writing to the closed stream."""
    import io
    import logging
    import sys

    from slimfleet.agent.cli_runner import setup_logging

    captured, saved = io.StringIO(), sys.stderr
    sys.stderr = captured
    try:
        setup_logging(0)
    finally:
        sys.stderr = saved
    captured.close()
    logging.getLogger("slimfleet.test").warning("after the run")
    assert "after the run" in capsys.readouterr().err


def test_a_bare_group_prints_its_help_not_an_error(monkeypatch, capsys):
    @click.group()
    def group() -> None:
        """A group of commands."""

    @group.command()
    def sub() -> None:
        pass

    monkeypatch.setattr("sys.argv", ["prog"])
    with pytest.raises(SystemExit) as info:
        run_cli(group, "prog")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("Usage: prog [OPTIONS] COMMAND")
    assert "error:" not in err and "A group of commands." in err
