"""The hooks a slimfleet plugin can implement.

A plugin is a module or object with functions named like the specs below and
decorated with :data:`hookimpl`. Built-in plugins live in ``slimfleet.plugins``;
third-party packages expose theirs through the ``slimfleet`` entry-point group::

    [project.entry-points.slimfleet]
    acme = "acme_slimfleet.plugin"

Each function's docstring is that hook's reference documentation: the README's hook
reference is generated from it (``python -m slimfleet.host.hookdoc``), and a test fails
when a hook has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import onnx

    from slimfleet.host.metrics import Metric
    from slimfleet.host.passes import Feed, Pass, PassContext, PassResult
    from slimfleet.host.recipes import Recipe
    from slimfleet.host.registry import Registry
    from slimfleet.host.sections import ReportSection

PROJECT = "slimfleet"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register compression passes by calling ``passes.add(MyPass())``.

    Called once when the plugin manager is set up. A name already taken by
    another plugin is an error that names both plugins.
    """


@hookspec
def slimfleet_add_recipes(recipes: Registry[Recipe], passes: Registry[Pass]) -> None:
    """Register recipes (named pass sequences) that ``compress``'s search tries.

    ``passes`` holds every registered pass, so a plugin can skip recipes whose
    passes are missing or disabled.
    """


@hookspec
def slimfleet_add_metrics(metrics: Registry[Metric]) -> None:
    """Register task metrics computed for every candidate beside built-in fidelity.

    A metric scores a candidate's outputs against the original's in [0, 1]; a
    candidate scoring below the fidelity budget is rejected.
    """


@hookspec(firstresult=True)
def slimfleet_load_data(path: Path, inputs: Sequence[dict[str, Any]]) -> list[Feed] | None:
    """Load user samples from ``path`` for the model inputs described by ``inputs``.

    ``inputs`` is the model's input signature: ``[{"name", "dtype", "shape"}]``.
    Return one feed (input name -> array) per sample, or None when this plugin
    does not read that kind of path. The first non-None result wins; the
    built-in ``.npz`` reader runs last. Raise ``InputError`` for a file this
    plugin owns but cannot read.
    """


@hookspec(firstresult=True)
def slimfleet_convert(
    source: Any, example_inputs: Sequence[Feed], options: dict[str, Any]
) -> onnx.ModelProto | None:
    """Convert a model that is not ONNX (a front-end) and return the ONNX model.

    ``source`` is what the user gave ``compress``: a Python object (an ``nn.Module``,
    an estimator; ``module:attr`` on the CLI is already imported) or a path that is
    not an ``.onnx`` file. ``example_inputs`` are the user's samples, one feed (input
    name -> array with its batch axis) each. Return None when this front-end does not
    know the source. A front-end must check its result by running the source and
    onnxruntime on ``example_inputs`` (``slimfleet.host.convert.check``) and raise
    ``ConversionError`` on a mismatch; a missing framework raises
    ``slimfleet.host.convert.missing_extra(...)``.
    """


@hookspec(firstresult=True)
def slimfleet_apply_pass(
    pass_: Pass, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
) -> PassResult | None:
    """Apply one pass to a model and return its result.

    ``options`` are already resolved: the search calls ``pass_.resolve_options`` once
    per step, so every declared option is present, defaults filled in and values
    coerced. The built-in implementation calls ``pass_.apply``. Implement this hook with
    ``wrapper=True`` to time, log or post-process every pass (the way pytest's
    ``pytest_runtest_call`` is wrapped), or return a result to replace a pass.

    During ``compress`` every pass runs in a forked child process with a timeout and a
    memory limit (``context.memory``), so this hook is called in that child: changes a
    wrapper makes to its own memory do not reach the parent (write to a file instead).
    """


@hookspec
def slimfleet_report_section(report: dict[str, Any]) -> ReportSection | None:
    """Return a section to append to ``report.json`` and ``report.html``, or None.

    ``report`` is the finished report dictionary (candidates, choice, reasons).
    """
