"""The ``e2e`` fixture: a fleet of three devices with real agents (see tests/e2e_rig.py)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import Mosquitto
from e2e_rig import E2E


@pytest.fixture
def e2e(
    mosquitto: Mosquitto, request: pytest.FixtureRequest, tmp_path: Path, capsys, monkeypatch
) -> Iterator[E2E]:
    # the shared ``prefix`` fixture cuts names at 60 characters: parameters of a long test
    # name would share one prefix (and their retained messages) on the session broker
    prefix = f"slimfleet-e2e/{zlib.crc32(request.node.nodeid.encode()):08x}"
    rig = E2E(mosquitto, prefix, tmp_path, capsys, monkeypatch)
    try:
        yield rig
    finally:
        rig.close()
