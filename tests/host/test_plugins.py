"""The plugin manager: built-ins registered like third-party plugins, env switches,
duplicate names, and a real third-party distribution installed with pip."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import models
import pytest

from slimfleet.host import plugins
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Pass

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "slimfleet-example-plugin"
SLIMFLEET = Path(sys.executable).with_name("slimfleet")


def test_builtins_are_registered_by_module_name():
    pm = plugins.make_plugin_manager(entry_points=False)
    for name in plugins.BUILTIN_PLUGINS:
        assert pm.get_plugin(name) is sys.modules[name]
    loaded = plugins.load_plugins(pm)
    assert loaded.passes.plugin_of("fp16") == "slimfleet.plugins.fp16"
    assert len(loaded.recipes) > 0


def test_builtin_hookimpls_are_documented_and_typed():
    pm = plugins.make_plugin_manager(entry_points=False)
    for name in plugins.BUILTIN_PLUGINS:
        for caller in pm.get_hookcallers(pm.get_plugin(name)) or []:
            function = getattr(sys.modules[name], caller.name)
            where = f"{name}.{caller.name}"
            assert (function.__doc__ or "").strip(), f"{where} has no docstring"
            params = inspect.signature(function).parameters
            assert all(p.annotation is not p.empty for p in params.values()), where
            assert "return" in function.__annotations__, f"{where} has no return type"


def test_managers_are_independent():
    first = plugins.make_plugin_manager(entry_points=False)
    first.unregister(name="slimfleet.plugins.fp16")
    second = plugins.load_plugins(plugins.make_plugin_manager(entry_points=False))
    assert "fp16" in second.passes


def test_disable_env_removes_a_plugin(monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_ENV, "slimfleet.plugins.fp16, slimfleet.plugins.prune")
    loaded = plugins.load_plugins(plugins.make_plugin_manager(entry_points=False))
    assert "fp16" not in loaded.passes and "prune" not in loaded.passes
    assert "quantize_dynamic" in loaded.passes
    assert "fp16" not in {r.name for r in loaded.recipes}  # its recipe needs the pass


def test_trace_env_logs_hook_calls(monkeypatch, caplog):
    monkeypatch.setenv(plugins.TRACE_ENV, "1")
    with caplog.at_level(logging.DEBUG, logger="slimfleet.plugins"):
        plugins.load_plugins(plugins.make_plugin_manager(entry_points=False))
    traced = caplog.text
    assert "slimfleet_add_passes" in traced and "slimfleet_add_recipes" in traced


def test_no_tracing_without_the_env(monkeypatch, caplog):
    monkeypatch.delenv(plugins.TRACE_ENV, raising=False)
    with caplog.at_level(logging.DEBUG, logger="slimfleet.plugins"):
        plugins.load_plugins(plugins.make_plugin_manager(entry_points=False))
    assert "slimfleet_add_passes" not in caplog.text


class Squatter:
    """A plugin that tries to take a built-in pass name."""

    class Simplify(Pass):
        name = "simplify"
        description = "not the real one"

    @hookimpl
    def slimfleet_add_passes(self, passes):
        passes.add(self.Simplify(), plugin="acme_squatter")


def test_duplicate_pass_names_are_an_error_naming_both_plugins():
    pm = plugins.make_plugin_manager(entry_points=False)
    pm.register(Squatter())
    with pytest.raises(ValueError) as info:
        plugins.load_plugins(pm)
    message = str(info.value)
    assert message.startswith("pass 'simplify' is registered by both ")
    assert "slimfleet.plugins.simplify" in message and "acme_squatter" in message


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory) -> Path:
    """The example distribution, built and installed by pip into its own directory."""
    if importlib.util.find_spec("tomllib") is None:
        pytest.skip("the example plugin's build backend needs Python 3.11 (tomllib)")
    tmp = tmp_path_factory.mktemp("example-plugin")
    source = shutil.copytree(
        FIXTURE, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    target = tmp / "site"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
            "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )  # fmt: skip
    assert list(target.glob("slimfleet_example_plugin-*.dist-info"))
    return target


def _slimfleet(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [str(SLIMFLEET), *args], capture_output=True, text=True, env=env, timeout=240
    )


def test_an_installed_plugin_pass_is_listed(example_plugin):
    proc = _slimfleet(example_plugin, "passes", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert rows["round_weights"]["plugin"] == "slimfleet_example.plugin"
    assert rows["round_weights"]["options"][0]["name"] == "decimals"
    assert "quantize_dynamic" in rows  # the built-ins are still there


def test_an_installed_plugin_pass_is_used(example_plugin, tmp_path):
    model = models.save(models.mlp(), tmp_path / "mlp.onnx")
    out = tmp_path / "out"
    proc = _slimfleet(
        example_plugin, "compress", str(model), "-o", str(out), "--passes",
        "round_weights[decimals=2]", "--input-shape", "x:1x64", "--quick", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    candidate = report["candidates"][1]
    assert candidate["label"] == "round_weights[decimals=2]"
    assert candidate["steps"] == [
        {
            "pass": "round_weights",
            "options": {"decimals": 2},
            "status": "applied",
            "notes": "rounded 4 initializers",
            "seconds": candidate["steps"][0]["seconds"],
            "auto": False,
        }
    ]
    assert candidate["status"] in ("accepted", "rejected")


def test_the_plugin_is_not_seen_without_its_path():
    proc = subprocess.run(
        [str(SLIMFLEET), "passes", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "round_weights" not in {row["name"] for row in json.loads(proc.stdout)}
