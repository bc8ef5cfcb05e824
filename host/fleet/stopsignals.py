"""Stopping long-running host commands on Ctrl-C or SIGTERM without an exception.

Python raises KeyboardInterrupt wherever the main thread happens to be, including inside
paho while it holds one of its locks: the network thread then waits on that lock for
ever and the command never exits (seen once in ``events --follow``). Long-running
commands (``broker``, ``events --follow``, ``monitor``, ``exporter``) instead turn
SIGINT and SIGTERM into an Event their main loop polls, and stop cleanly between steps.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An Event set by SIGINT or SIGTERM while the block runs (main thread only); the
    previous handlers are restored after it."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
