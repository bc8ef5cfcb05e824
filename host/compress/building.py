"""Applying one pass to a model file, in a child process of its own.

A pass is third-party code over third-party libraries (onnxsim, onnxruntime's
quantizer): it may segfault, hang or take all the memory. :func:`apply_step` forks a
child (see :mod:`~slimfleet.host.compress.isolation`) that loads the model, asks the
pass's ``check``, runs the ``slimfleet_apply_pass`` hook and saves the result; the
parent only ever holds the file's path, digest and opset (:class:`ModelFile`), never
the candidate models themselves. Every way the child can end is a
:class:`StepOutcome`, so the search records it and goes on.

Hook implementations (wrappers of ``slimfleet_apply_pass``) therefore run in the child:
their side effects in memory do not reach the parent process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress import isolation
from slimfleet.host.compress.isolation import Limits
from slimfleet.host.compress.modelfile import digest, opset, save_model
from slimfleet.host.passes import Pass, PassContext
from slimfleet.host.plugins import Plugins


@dataclass(frozen=True)
class ModelFile:
    """A model the search built, on disk: what the parent keeps instead of the model."""

    path: Path
    digest: str
    """sha256 of the serialized model: equal digests are the same candidate."""
    opset: int


def describe(model: onnx.ModelProto, path: Path) -> ModelFile:
    """The :class:`ModelFile` of ``model``, already saved at ``path``."""
    return ModelFile(path, digest(model), opset(model))


@dataclass(frozen=True)
class StepOutcome:
    """``applied``/``unchanged`` with the new model, ``skipped`` (``check`` said why, the
    model is unchanged) or ``failed`` (``notes`` is the reason)."""

    status: str
    notes: str
    model: ModelFile | None = None
    seconds: float = 0.0


def _step_in_child(
    plugins: Plugins,
    source: onnx.ModelProto | Path,
    pass_: Pass,
    options: dict[str, Any],
    context: PassContext,
    target: Path,
) -> tuple[str, str, ModelFile | None]:
    # Libraries under a pass drop temp files in the working directory (onnxruntime's
    # quant_pre_process leaves "*.data" and "sym_shape_infer_temp.onnx" there): this
    # child works in the candidate's scratch folder, removed with the search.
    os.chdir(context.workdir)
    model = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source))
    try:
        reason = pass_.check(model, context, options)
    except Exception as exc:  # a plugin's bug fails this candidate, never the search
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SlimfleetError(f"check raised {type(exc).__name__}: {first}") from None
    if reason:
        return "skipped", reason, None
    result = plugins.pm.hook.slimfleet_apply_pass(
        pass_=pass_, model=model, context=context, options=options
    )
    if result is None:
        raise SlimfleetError("no plugin implements slimfleet_apply_pass")
    del model
    save_model(result.model, target)
    return (
        "applied" if result.changed else "unchanged",
        result.notes,
        describe(result.model, target),
    )


def apply_step(
    plugins: Plugins,
    source: onnx.ModelProto | Path,
    pass_: Pass,
    options: dict[str, Any],
    context: PassContext,
    target: Path,
    limits: Limits,
) -> StepOutcome:
    """Run ``pass_`` (resolved ``options``) on ``source`` in a child within ``limits``.

    ``source`` is a model file, or the original model in memory (the child inherits it).
    The result is saved at ``target``.
    """
    outcome = isolation.call(
        _step_in_child,
        plugins,
        source,
        pass_,
        options,
        context,
        target,
        limits=limits,
        workdir=target.parent / f"{target.stem}.child",
    )
    if not outcome.ok:
        return StepOutcome("failed", f"{pass_.name}: {outcome.failure}", seconds=outcome.seconds)
    status, notes, model = outcome.value
    return StepOutcome(status, notes, model, outcome.seconds)
