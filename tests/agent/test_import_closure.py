"""A device installs the base package only: the agent must not import host-side packages."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("onnx", "onnxsim", "pluggy", "slimfleet.host", "slimfleet.plugins")

PROBE = """
import importlib, json, pkgutil, sys
import slimfleet.agent
names = sorted(m.name for m in pkgutil.iter_modules(slimfleet.agent.__path__))
for name in names:
    importlib.import_module("slimfleet.agent." + name)
for extra in sys.argv[2:]:
    importlib.import_module(extra)
forbidden = json.loads(sys.argv[1])
loaded = sorted(
    m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden)
)
print(json.dumps({"modules": names, "forbidden": loaded}))
"""


def probe(*extra: str) -> dict[str, list[str]]:
    """Import every slimfleet.agent module (and ``extra``) in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(FORBIDDEN), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_agent_modules_import_no_host_side_package() -> None:
    result = probe()
    expected = {"config", "configfile", "errors", "mqtt", "serve", "sessions", "signing"}
    assert expected | {"store", "telemetry", "wire"} <= set(result["modules"])
    assert result["forbidden"] == []


def test_the_probe_sees_a_forbidden_import() -> None:
    """The check itself works: importing onnx next to the agent is reported."""
    assert probe("onnx")["forbidden"][:1] == ["onnx"]
