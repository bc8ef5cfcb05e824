"""Contract modules (what plugins implement and call) import only other contracts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HOST = Path(__file__).resolve().parents[2] / "host"
CONTRACTS = {
    "slimfleet.host.hookspecs",
    "slimfleet.host.passes",
    "slimfleet.host.metrics",
    "slimfleet.host.recipes",
    "slimfleet.host.registry",
    "slimfleet.host.feeds",
    "slimfleet.host.sections",
}
ALLOWED = CONTRACTS | {"slimfleet.agent.errors"}


def _slimfleet_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimfleet"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slimfleet")}
    return found


@pytest.mark.parametrize("module", sorted(CONTRACTS))
def test_a_contract_imports_only_contracts(module):
    path = HOST / (module.removeprefix("slimfleet.host.").replace(".", "/") + ".py")
    assert _slimfleet_imports(path) <= ALLOWED, f"{module} imports an implementation"
