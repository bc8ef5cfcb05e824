"""Builds the plugin manager: built-in plugins, entry-point plugins, env switches.

* ``SLIMFLEET_DISABLE_PLUGINS=name1,name2`` skips plugins by registered name
  (built-ins are named by module, e.g. ``slimfleet.plugins.fp16``; entry-point
  plugins by entry-point name).
* ``SLIMFLEET_TRACE_PLUGINS=1`` logs every hook call and result to the
  ``slimfleet.plugins`` logger at DEBUG level.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field

import pluggy

from slimfleet.host import hookspecs
from slimfleet.host.metrics import Metric
from slimfleet.host.passes import Pass
from slimfleet.host.recipes import Recipe
from slimfleet.host.registry import Registry

log = logging.getLogger("slimfleet.plugins")

# Registered in this order, exactly like third-party plugins (by module object).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "slimfleet.plugins.normalize",
    "slimfleet.plugins.simplify",
    "slimfleet.plugins.ortopt",
    "slimfleet.plugins.quantize_dynamic",
    "slimfleet.plugins.smoothquant",
    "slimfleet.plugins.gptq",
    "slimfleet.plugins.quantize_static",
    "slimfleet.plugins.fp16",
    "slimfleet.plugins.prune",
    "slimfleet.plugins.prune_refit",
    "slimfleet.plugins.qat",
    "slimfleet.plugins.recipes",
    "slimfleet.plugins.npzdata",
    "slimfleet.plugins.runpass",
    "slimfleet.plugins.frontends.pytorch",
    "slimfleet.plugins.frontends.scikit_learn",
    "slimfleet.plugins.frontends.paddlepaddle",
)

DISABLE_ENV = "SLIMFLEET_DISABLE_PLUGINS"
TRACE_ENV = "SLIMFLEET_TRACE_PLUGINS"


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def make_plugin_manager(*, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the built-in and installed plugins registered and checked."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = _disabled()
    for name in disabled:
        pm.set_blocked(name)
    for name in BUILTIN_PLUGINS:
        if name not in disabled:
            pm.register(importlib.import_module(name), name=name)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    pm.check_pending()  # a misspelt hook name fails here, not silently
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda text: log.debug(text.rstrip()))
        pm.enable_tracing()
    return pm


@dataclass
class Plugins:
    """The manager with what its plugins registered, built once per command."""

    pm: pluggy.PluginManager
    passes: Registry[Pass] = field(default_factory=lambda: Registry("pass"))
    recipes: Registry[Recipe] = field(default_factory=lambda: Registry("recipe"))
    metrics: Registry[Metric] = field(default_factory=lambda: Registry("metric"))


def load_plugins(pm: pluggy.PluginManager | None = None) -> Plugins:
    """Build (or take) a manager and collect passes, recipes and metrics from it."""
    plugins = Plugins(pm or make_plugin_manager())
    hook = plugins.pm.hook
    hook.slimfleet_add_passes(passes=plugins.passes)
    hook.slimfleet_add_recipes(recipes=plugins.recipes, passes=plugins.passes)
    hook.slimfleet_add_metrics(metrics=plugins.metrics)
    return plugins
