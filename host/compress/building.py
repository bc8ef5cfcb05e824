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

:class:`RecipeBuilding` chains these steps into a candidate's model (upgrading the opset
with :data:`UPGRADE_PASS` where a pass needs it, reusing models of shared step prefixes);
a step that fails raises :class:`StepFailed` with a one-line reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress import isolation
from slimfleet.host.compress.candidate import StepRecord
from slimfleet.host.compress.isolation import Limits
from slimfleet.host.compress.modelfile import digest, imports_default_domain, opset, save_model
from slimfleet.host.passes import Pass, PassContext
from slimfleet.host.plugins import Plugins
from slimfleet.host.recipes import Step

log = logging.getLogger(__name__)


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


UPGRADE_PASS = "normalize"
"""The pass (with option ``opset``) run when a pass needs a newer opset than the model's."""


def step_key(steps: Sequence[Step]) -> tuple[str, ...]:
    """What identifies a prefix of steps (the models built for it are shared)."""
    return tuple(s.label() for s in steps)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, SlimfleetError) and text:
        return text.splitlines()[0]
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}"


class StepFailed(Exception):
    """A pass raised; the candidate fails with this one-line reason."""


class RecipeBuilding:
    """Building a candidate's model from the original, step by step (a mixin of
    :class:`~slimfleet.host.compress.search.Search`; it uses the search's ``model``,
    ``original_file``, ``plugins``, ``plan``, ``samples``, ``settings``, ``workdir``,
    ``given_metrics``,
    ``_prefixes``, ``_shared``, ``_steps_run`` and ``_options``). A failing step raises
    :class:`StepFailed`; every step is recorded as a :class:`StepRecord`."""

    def _build(
        self, steps: Sequence[Step], records: list[StepRecord], candidate_id: int
    ) -> ModelFile:
        """Apply ``steps`` to the original, reusing models built for shared prefixes.

        Each pass runs in its own process; the models live on disk. A step's output
        that no later candidate shares is deleted once the next step has read it.
        """
        model, start = self.original_file, 0
        for length in range(len(steps), 0, -1):
            cached = self._prefixes.get(step_key(steps[:length]))
            if cached is not None:
                model, done = cached
                records.extend(done)
                start = length
                break
        context = PassContext(
            workdir=self.workdir / f"cand-{candidate_id}" / "work",
            calibration=self.samples.calibration,
            threads=self.settings.threads,
            metrics={name: spec.label() for name, spec in self.given_metrics.items()},
        )
        context.workdir.mkdir(parents=True, exist_ok=True)
        kept = {m.path for m, _ in self._prefixes.values()} | {self.model_path}
        for index in range(start, len(steps)):
            before = model
            model = self._apply(model, steps[index], records, context)
            if before.path != model.path and before.path not in kept:
                before.path.unlink(missing_ok=True)
            if step_key(steps[: index + 1]) in self._shared:
                self._prefixes[step_key(steps[: index + 1])] = (model, list(records))
                kept.add(model.path)
        return model

    def _apply(
        self,
        model: ModelFile,
        step: Step,
        records: list[StepRecord],
        context: PassContext,
    ) -> ModelFile:
        try:
            pass_ = self.plugins.passes.get(step.pass_name)
            options = self._options(step)
        except SlimfleetError as exc:
            records.append(StepRecord(step.pass_name, dict(step.options), "failed", str(exc)))
            raise StepFailed(str(exc)) from None
        try:
            needed = pass_.min_opset(options)
        except Exception as exc:  # a plugin's bug fails this candidate, never the search
            reason = f"{pass_.name}: min_opset raised {_one_line(exc)}"
            records.append(StepRecord(pass_.name, options, "failed", reason))
            raise StepFailed(reason) from None
        # every model meets opset 1 (the default), an ai.onnx.ml-only one (opset 0) too
        upgrade = needed > max(model.opset, 1)
        if upgrade and not imports_default_domain(self.model):
            reason = "the model has no ai.onnx operators to upgrade (only other domains)"
            records.append(StepRecord(pass_.name, options, "skipped", reason))
            return model
        if upgrade:
            model = self._upgrade(model, needed, pass_.name, records, context)
        return self._run_pass(pass_, model, options, records, context)

    def _run_pass(
        self,
        pass_: Pass,
        model: ModelFile,
        options: dict[str, Any],
        records: list[StepRecord],
        context: PassContext,
        auto: bool = False,
    ) -> ModelFile:
        self._steps_run += 1
        target = context.workdir.parent / f"step-{self._steps_run}-{pass_.name}.onnx"
        limits = self.plan.child_limits()
        context.memory = limits.memory
        source = self.model if model is self.original_file else model.path
        done = apply_step(self.plugins, source, pass_, options, context, target, limits)
        records.append(StepRecord(pass_.name, options, done.status, done.notes, done.seconds, auto))
        if done.status == "failed":
            raise StepFailed(done.notes)
        log.info("%s: %s %s", pass_.name, done.status, done.notes)
        return done.model or model

    def _upgrade(
        self,
        model: ModelFile,
        needed: int,
        for_pass: str,
        records: list[StepRecord],
        context: PassContext,
    ) -> ModelFile:
        if UPGRADE_PASS not in self.plugins.passes:
            reason = (
                f"{for_pass} needs opset {needed}, the model has {model.opset}, and no "
                f"{UPGRADE_PASS!r} pass is registered to upgrade it"
            )
            records.append(StepRecord(for_pass, {}, "failed", reason))
            raise StepFailed(reason)
        upgrade = self.plugins.passes.get(UPGRADE_PASS)
        options = self._options(Step(UPGRADE_PASS, {"opset": needed}))
        return self._run_pass(upgrade, model, options, records, context, auto=True)
