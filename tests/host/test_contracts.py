"""Contract modules (what plugins implement and call) import only other contracts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"slimfleet.host.": REPO / "host", "slimfleet.agent.": REPO / "agent"}
CONTRACTS = {
    "slimfleet.host.hookspecs",
    "slimfleet.host.passes",
    "slimfleet.host.metrics",
    "slimfleet.host.recipes",
    "slimfleet.host.registry",
    "slimfleet.host.feeds",
    "slimfleet.host.sections",
    # the wire protocol both sides share
    "slimfleet.agent.wire",
    "slimfleet.agent.deployment",
    "slimfleet.agent.inference",
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
    prefix = next(p for p in FOLDERS if module.startswith(p))
    path = FOLDERS[prefix] / (module.removeprefix(prefix).replace(".", "/") + ".py")
    assert _slimfleet_imports(path) <= ALLOWED, f"{module} imports an implementation"
