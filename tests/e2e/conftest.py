"""The ``e2e`` fixture: a fleet of three devices with real agents (see tests/e2e_rig.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import Mosquitto
from e2e_rig import E2E


@pytest.fixture
def e2e(mosquitto: Mosquitto, prefix: str, tmp_path: Path, capsys, monkeypatch) -> Iterator[E2E]:
    rig = E2E(mosquitto, prefix, tmp_path, capsys, monkeypatch)
    try:
        yield rig
    finally:
        rig.close()
