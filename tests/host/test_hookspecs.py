"""Every hook is documented and exercised; a misspelt hook implementation is refused."""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest

from slimfleet.host import hookspecs, plugins
from slimfleet.host.hookspecs import hookimpl

TESTS = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("slimfleet_"))


def test_there_are_hooks_for_passes_data_metrics_and_the_report():
    assert {
        "slimfleet_add_passes",
        "slimfleet_add_recipes",
        "slimfleet_add_metrics",
        "slimfleet_load_data",
        "slimfleet_apply_pass",
        "slimfleet_report_section",
    } <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_docstring(name):
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert doc and len(doc.split()) >= 8, f"{name} needs a docstring: it is the hook reference"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_used_by_some_test(name):
    """A new hook must come with a test that names it (this file does not count)."""
    users = [
        path.relative_to(TESTS)
        for path in TESTS.rglob("*.py")
        if path.resolve() != Path(__file__).resolve() and name in path.read_text()
    ]
    assert users, f"no test under tests/ mentions {name}"


def test_every_hook_is_a_spec_the_manager_knows():
    pm = plugins.make_plugin_manager(entry_points=False)
    for name in HOOKS:
        assert getattr(pm.hook, name).spec is not None


class Misspelt:
    @hookimpl
    def slimfleet_add_pases(self, passes):  # sic
        raise AssertionError("never called")


def test_a_misspelt_hook_is_refused():
    pm = plugins.make_plugin_manager(entry_points=False)
    pm.register(Misspelt())
    with pytest.raises(pluggy.PluginValidationError, match="slimfleet_add_pases"):
        pm.check_pending()


def test_the_manager_refuses_a_misspelt_plugin_module_when_built(tmp_path, monkeypatch):
    (tmp_path / "misspelt_plugin.py").write_text(
        textwrap.dedent(
            """
            from slimfleet.host.hookspecs import hookimpl

            @hookimpl
            def slimfleet_report_sektion(report):
                return None
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "BUILTIN_PLUGINS", (*plugins.BUILTIN_PLUGINS, "misspelt_plugin"))
    with pytest.raises(pluggy.PluginValidationError, match="slimfleet_report_sektion"):
        plugins.make_plugin_manager(entry_points=False)
    sys.modules.pop("misspelt_plugin", None)


def test_a_hook_with_an_unknown_argument_is_refused():
    class WrongArgs:
        @hookimpl
        def slimfleet_add_passes(self, registry):
            raise AssertionError("never called")

    pm = plugins.make_plugin_manager(entry_points=False)
    with pytest.raises(pluggy.PluginValidationError, match="registry"):
        pm.register(WrongArgs())
