"""Long-running commands stop on SIGINT/SIGTERM through an Event, never an exception."""

from __future__ import annotations

import os
import signal

import pytest

from slimfleet.host.fleet.stopsignals import stop_signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_sets_the_event_instead_of_raising(sig):
    before = signal.getsignal(sig)
    with stop_signals() as stop:
        os.kill(os.getpid(), sig)  # KeyboardInterrupt or death without the handler
        assert stop.wait(5)
    assert signal.getsignal(sig) is before
