from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from slimfleet.host import hookdoc, hookspecs


def test_every_hook_is_in_the_reference_with_its_docstring():
    text = hookdoc.render()
    for name in hookdoc.hooks():
        assert f"### `{name}(" in text
        assert inspect.getdoc(getattr(hookspecs, name)) in text
    assert text.index("### `slimfleet_add_passes(") < text.index("### `slimfleet_report_section(")


def test_first_result_hooks_are_marked():
    sections = hookdoc.render().split("### ")
    marked = {s.split("(")[0].strip("`") for s in sections if "first non-None result wins" in s}
    assert marked == {"slimfleet_load_data", "slimfleet_convert", "slimfleet_apply_pass"}


def test_hooks_are_listed_in_definition_order():
    assert hookdoc.hooks()[:3] == [
        "slimfleet_add_passes",
        "slimfleet_add_recipes",
        "slimfleet_add_metrics",
    ]
    assert sorted(hookdoc.hooks()) == sorted(
        n for n in dir(hookspecs) if n.startswith("slimfleet_")
    )


def test_runs_as_a_module():
    proc = subprocess.run(
        [sys.executable, "-m", "slimfleet.host.hookdoc"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.startswith("## Hook reference")


def test_readme_carries_the_current_reference():
    """Regenerate with: python -m slimfleet.host.hookdoc, pasted between the markers."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("-->\n", readme.index("<!-- hooks:start")) + len("-->\n")
    end = readme.index("<!-- hooks:end -->")
    assert readme[start:end].strip() == hookdoc.render().strip()
