"""The search: build a candidate per recipe, measure each, fall back per layer, choose one.

:func:`compress` is the library entry point; ``slimfleet compress`` is a thin layer over it.
:class:`Search` drives one run: it measures the original, builds each candidate
(:class:`~slimfleet.host.compress.building.RecipeBuilding`), judges it
(:class:`~slimfleet.host.compress.judging.Judging`) and adds the fallback and recovery
variants of near misses (:class:`~slimfleet.host.compress.variants.Variants`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import onnx

from slimfleet.agent.errors import InputError
from slimfleet.host import convert
from slimfleet.host.compress import isolation, outdir, report, retrain
from slimfleet.host.compress.arrayfiles import ArrayFiles
from slimfleet.host.compress.building import ModelFile, RecipeBuilding, StepFailed, step_key
from slimfleet.host.compress.candidate import (
    ACCEPTED,
    BASELINE,
    FAILED,
    SKIPPED,
    Candidate,
    StepRecord,
)
from slimfleet.host.compress.choice import choose
from slimfleet.host.compress.data import Samples, load_samples
from slimfleet.host.compress.evaluate import (
    EvalSettings,
    Outputs,
    measure,
    write_samples,
)
from slimfleet.host.compress.fidelity import compare, score_metrics
from slimfleet.host.compress.judging import Judging
from slimfleet.host.compress.metricdetection import signature_specs
from slimfleet.host.compress.metricspec import MetricSpec
from slimfleet.host.compress.modelfile import (
    digest,
    io_signature,
    load_model,
    name_dynamic_dims,
    opset,
    save_model,
    total_size,
)
from slimfleet.host.compress.planning import Budget
from slimfleet.host.compress.resources import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_TIME_BUDGET,
    MIN_MAX_MEMORY,
    format_bytes,
)
from slimfleet.host.compress.variants import Variants
from slimfleet.host.plugins import Plugins, load_plugins
from slimfleet.host.recipes import Recipe, Step, parse_recipe

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "size")
SHORT_TIMING = EvalSettings(min_repeats=3, max_repeats=20, latency_seconds=0.3)
"""Latency timing when the full one would not fit the time budget."""
GIVE_UP_FACTOR = 3.0
GIVE_UP_FLOOR_MS = 200.0
"""A candidate whose run takes 3x the original's median latency (and at least 200 ms: short
runs are noisy and cheap to finish) is stopped and rejected."""

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``; ``total`` grows when fallback variants are added."""


def compress(
    model_path: Any,
    outdir_path: Path | str,
    *,
    data: Path | str | None = None,
    passes: str | None = None,
    fidelity: float = 0.99,
    objective: str = "latency",
    threads: int = 1,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    metrics: dict[str, MetricSpec] | None = None,
    progress: Progress | None = None,
    plugins: Plugins | None = None,
    settings: EvalSettings | None = None,
    force: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    time_budget: float = DEFAULT_TIME_BUDGET,
    train_budget: float | None = None,
) -> report.Report:
    """Find the best model inside the fidelity budget and write it with its report.

    ``model_path`` is an ONNX file, or a model a front-end converts first (an
    ``nn.Module``, a fitted estimator, ``module:attr``, a ``.pt``/``.pt2`` file, a
    Paddle inference directory; see :mod:`slimfleet.host.convert`), written as
    ``converted.onnx`` in ``outdir_path`` and checked against the source on ``data``.
    ``outdir_path`` receives ``model.onnx``, ``report.json``, ``report.html`` and
    ``sample.npz``. ``passes`` (``"simplify,quantize_dynamic[op_types=MatMul]"``) runs
    that one recipe instead of every registered one; a pass in it that skips (its check
    says why not) is an InputError. ``metrics`` sets the task metric of outputs by name
    (``--metric``); the others are detected. ``force`` writes into a non-empty
    ``outdir`` that holds no earlier output. ``settings`` overrides how
    candidates are measured (its ``threads`` is replaced by ``threads``). Every pass and
    every evaluation runs in a child process (``settings.timeout`` bounds each candidate);
    the whole process tree stays under ``max_memory`` bytes and the search plans within
    ``time_budget`` seconds (see :mod:`~slimfleet.host.compress.planning`). Bad input
    raises :class:`InputError`; temp files are removed in every case. ``train_budget``
    (seconds, ``--train-budget``) turns on accuracy recovery: when the best post-training
    int8 candidate missed the budget, it is rebuilt with quantization-aware training
    (pass ``qat``) for that long, which adds to ``time_budget``; a ``qat`` or
    ``prune_refit`` step that ``passes`` names without ``seconds`` trains that long too.
    """
    started = time.monotonic()
    isolation.TREE_PEAK.reset()
    if objective not in OBJECTIVES:
        raise InputError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if not 0 < fidelity <= 1:
        raise InputError(f"fidelity {fidelity}: must be in (0, 1]")
    if threads < 1:
        raise InputError(f"threads {threads}: must be at least 1")
    if max_memory <= 0 or time_budget <= 0:
        raise InputError("--max-memory and --time-budget must be positive")
    if max_memory < MIN_MAX_MEMORY:
        raise InputError(
            f"--max-memory {format_bytes(max_memory)}: at least {format_bytes(MIN_MAX_MEMORY)} "
            "(compress itself takes about 350 MiB before the first model is loaded)"
        )
    if train_budget is not None and train_budget <= 0:
        raise InputError(f"--train-budget {train_budget}: must be positive")
    settings = replace(settings or EvalSettings(), threads=threads)
    budget = Budget(time_budget, max_memory, settings.timeout, started)
    plugins = plugins or load_plugins()
    out = Path(outdir_path)
    created = not out.exists()
    converted = not convert.is_onnx(model_path)
    if converted:  # a front-end converts it to outdir/converted.onnx
        outdir.prepare(out, force=force)
        try:
            model_path = convert.convert_to_file(
                model_path, plugins.pm.hook, out, data=data, input_shapes=input_shapes
            )
        except BaseException:
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            raise
    model_path = Path(model_path)
    model = load_model(model_path, external_data=True)
    recipes = _recipes(plugins, passes)
    if passes is not None and train_budget:  # 'qat' or 'prune_refit' named without seconds
        recipes[0], training = retrain.with_train_budget(recipes[0], train_budget)
        budget.seconds += training * train_budget
        budget.candidate_timeout += training * train_budget
    signature = io_signature(model)
    stale: tuple[str, ...] = ()
    if not converted:  # a model beside other files in OUTDIR is the user's: --force
        outdir.prepare(out, force=force)
        stale = outdir.stale_files(out, model_path)
    try:
        samples = load_samples(plugins.pm.hook, data, signature["inputs"], input_shapes)
        with tempfile.TemporaryDirectory(prefix="slimfleet-compress-") as tmp:
            runnable = model_path
            if name_dynamic_dims(model):  # measured, and kept, with its dims named
                runnable = Path(tmp) / "original.onnx"
                save_model(model, runnable)
            search = Search(
                model,
                runnable,
                plugins,
                samples,
                settings,
                Path(tmp),
                fidelity,
                objective,
                metrics,
            )
            search.plan = budget
            search.progress = progress
            search.train_budget = train_budget
            search.run(recipes)
            if passes is not None:
                _refuse_skipped_steps(search.candidates[1:])
            choice = choose(search.candidates, objective)
            doc = report.build(
                model_path=model_path,
                model=model,
                candidates=search.candidates,
                choice=choice,
                settings={
                    "objective": objective,
                    "fidelity": fidelity,
                    "threads": threads,
                    "passes": passes,
                    "data": str(data) if data is not None else None,
                    "input_shapes": {k: list(v) for k, v in (input_shapes or {}).items()},
                    "metrics": {k: v.label() for k, v in (metrics or {}).items()},
                    "evaluation": asdict(settings),
                    "max_memory": max_memory,
                    "time_budget": time_budget,
                    "train_budget": train_budget,
                },
                samples=samples,
                elapsed=time.monotonic() - started,
            )
            doc["resources"] = {
                **budget.describe(),
                "peak_tree_rss_bytes": isolation.TREE_PEAK.bytes,
                "skipped": search.skipped,
            }
            doc["warnings"].extend(search.skipped)
            doc["sections"] = report.sections(plugins.pm.hook, doc)
            assert choice.candidate.path is not None
            report.write(out, doc, choice.candidate.path, samples.evaluation[0], stale=stale)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return report.Report(doc, out)


def _recipes(plugins: Plugins, passes: str | None) -> list[Recipe]:
    if passes is None:
        recipes = list(plugins.recipes)
        if not recipes:
            log.warning("no recipes are registered: only the original model is measured")
        return recipes
    recipe = parse_recipe(passes)
    for step in recipe.steps:
        plugins.passes.get(step.pass_name).resolve_options(step.options)
    return [recipe]


def _refuse_skipped_steps(candidates: Sequence[Candidate]) -> None:
    """A pass the user asked for by name that did not run is invalid input (exit 2)."""
    for candidate in candidates:
        for step in candidate.steps:
            if step.status == "skipped" and not step.auto:
                raise InputError(f"--passes: pass {step.pass_name} was skipped: {step.notes}")


class Search(Judging, Variants, RecipeBuilding):
    """The candidates of one ``compress`` run, built in ``workdir`` (a temp dir)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        model_path: Path,
        plugins: Plugins,
        samples: Samples,
        settings: EvalSettings,
        workdir: Path,
        budget: float,
        objective: str = "latency",
        metrics: dict[str, MetricSpec] | None = None,
    ) -> None:
        self.model = model
        self.model_path = model_path
        self.plugins = plugins
        self.samples = samples
        self.settings = settings
        self.workdir = workdir
        self.budget = budget
        self.objective = objective
        self.sample_paths = write_samples(samples.evaluation, workdir / "samples")
        # From here on samples are read from disk when used, one at a time.
        samples.evaluation = ArrayFiles(self.sample_paths)
        samples.calibration = ArrayFiles(
            write_samples(samples.calibration, workdir / "calibration")
        )
        self.plan = Budget(candidate_timeout=settings.timeout)
        """What the search may spend (time, memory); see ``planning``."""
        self.skipped: list[str] = []
        """What the budget left out (one line each), for the report's warnings."""
        self.original_file = ModelFile(model_path, digest(model), opset(model))
        self.candidates: list[Candidate] = []
        self.recipes: dict[int, Recipe] = {}
        self.reference: Sequence[Outputs] = []
        self.given_metrics = dict(metrics or {})
        """``--metric`` choices by output name; the others are detected."""
        self.specs: dict[str, MetricSpec] = {}
        """The metric of every output, fixed once the original has run."""
        self.progress: Progress | None = None
        self._done = 0
        self._total = 0
        self._prefixes: dict[tuple[str, ...], tuple[ModelFile, list[StepRecord]]] = {}
        self._shared: set[tuple[str, ...]] = set()
        """Step prefixes that several candidates start with: their models are kept."""
        self._digests: dict[str, int] = {}
        self._missed_budget: set[int] = set()
        self._steps_run = 0
        self._alone: dict[str, Any] = {}
        """The original's latency measured alone, for candidates that did not race."""
        self._resolved: dict[str, dict[str, Any]] = {}
        """Resolved options by step label (see :meth:`_options`)."""
        self.train_budget: float | None = None
        """Seconds of quantization-aware training for accuracy recovery (None: off)."""

    # -- driving ------------------------------------------------------------------------

    def run(self, recipes: Sequence[Recipe]) -> None:
        """Measure the original and every recipe, add fallback variants of near misses,
        then race the finalists against the original and give the latency verdicts."""
        self._total = len(recipes) + 2
        self._shared = {step_key(r.steps[:n]) for r in recipes for n in range(1, len(r.steps))}
        self._measure_original()
        self._shorten_if_needed(len(recipes))
        for recipe in recipes:
            self.try_recipe(recipe)
        for candidate in self._fallback_targets():
            self._fall_back(candidate)
        self._recover()
        self._race()
        for candidate in self.candidates:
            if candidate.status == ACCEPTED:
                self._judge_latency(candidate)
        if self.progress is not None:
            self.progress(self._total, self._total, "done")

    def _shorten_if_needed(self, candidates: int) -> None:
        """When ``candidates`` at the estimated cost would not fit the time budget, time
        latency with fewer runs (the finalists are raced against the original anyway)."""
        planned = candidates * self.plan.candidate_cost()
        left = self.plan.remaining()
        if planned <= left or self.settings.min_repeats <= SHORT_TIMING.min_repeats:
            return
        self.settings = replace(
            self.settings,
            min_repeats=SHORT_TIMING.min_repeats,
            max_repeats=min(self.settings.max_repeats, SHORT_TIMING.max_repeats),
            latency_seconds=min(self.settings.latency_seconds, SHORT_TIMING.latency_seconds),
        )
        self.skipped.append(
            f"shortened latency timing to {SHORT_TIMING.min_repeats} runs: {candidates} "
            f"candidates at about {self.plan.candidate_cost():.0f} s each would not fit in "
            f"the {left:.0f} s left of the time budget"
        )

    def _step(self, label: str, *, counts: bool = True) -> None:
        """Report progress at the start of a unit of work (``counts``: one of ``_total``)."""
        if self.progress is not None:
            self.progress(self._done, self._total, label)
        self._done += counts

    def _measure_original(self) -> None:
        original = Candidate(
            0, "original", "(original)", "(original)", "the model as given", lossless=True
        )
        original.path = self.model_path
        original.size_bytes = total_size(self.model_path)
        self.candidates.append(original)
        self._step("measuring the original")
        started = time.monotonic()
        original.measurement = measure(
            self.model_path, self.sample_paths, self._eval_settings(), self.workdir / "cand-0"
        )
        self.plan.learn_original(time.monotonic() - started)
        if original.measurement.error:
            raise InputError(
                f"{self.model_path}: onnxruntime cannot run the original model "
                f"({original.measurement.error})"
            )
        self.reference = original.measurement.outputs
        original.measurement.outputs = []
        signature = io_signature(self.model)
        self.specs = signature_specs(self.reference, signature, self.given_metrics)
        original.fidelity = compare(self.reference, self.reference, self.specs)
        original.metrics = score_metrics(self.plugins.metrics, self.reference, self.reference)
        original.status, original.reason = BASELINE, "the reference for every other candidate"
        self._digests[self.original_file.digest] = 0

    def _eval_settings(self) -> EvalSettings:
        """The evaluation settings with the next child's limits (time and memory), and
        once the original is timed, the latency at which a candidate is given up."""
        limits = self.plan.child_limits()
        original = self.candidates[0].latency_ms if self.candidates else None
        give_up = max(original * GIVE_UP_FACTOR, GIVE_UP_FLOOR_MS) if original else None
        return replace(
            self.settings, timeout=limits.timeout, memory=limits.memory, give_up_ms=give_up
        )

    # -- building -----------------------------------------------------------------------

    def try_recipe(
        self,
        recipe: Recipe,
        *,
        parent: int | None = None,
        excluded: Sequence[str] = (),
        label: str | None = None,
    ) -> Candidate:
        """Build, measure and judge one candidate; every outcome is recorded on it."""
        candidate = Candidate(
            id=len(self.candidates),
            recipe=recipe.name,
            label=label or (recipe.name if recipe.name in self.plugins.recipes else recipe.label()),
            pipeline=recipe.label(),
            description=recipe.description,
            lossless=self._lossless(recipe),
            parent=parent,
            excluded_nodes=list(excluded),
        )
        self._step(candidate.label)
        self.candidates.append(candidate)
        self.recipes[candidate.id] = recipe
        over = self.plan.why_not()
        if over:
            candidate.status, candidate.reason = SKIPPED, over
            self.skipped.append(f"skipped #{candidate.id} {candidate.label}: {over}")
            return candidate
        started = time.monotonic()
        self.plan.start_candidate()
        try:
            self._build_and_measure(recipe, candidate)
        finally:
            self.plan.finish_candidate(time.monotonic() - started)
        return candidate

    def _build_and_measure(self, recipe: Recipe, candidate: Candidate) -> None:
        try:
            model = self._build(recipe.steps, candidate.steps, candidate.id)
        except StepFailed as exc:
            candidate.status, candidate.reason = FAILED, str(exc)
            return
        if model.digest in self._digests:
            same = self._digests[model.digest]
            candidate.status = SKIPPED
            candidate.reason = (
                "no pass changed the model" if same == 0 else f"same model as candidate #{same}"
            )
            why = "; ".join(f"{s.pass_name}: {s.notes}" for s in candidate.steps if s.notes)
            if why:
                candidate.reason += f" ({why})"
            return
        self._digests[model.digest] = candidate.id
        candidate.path = model.path
        candidate.size_bytes = total_size(candidate.path)
        candidate.measurement = measure(
            candidate.path,
            self.sample_paths,
            self._eval_settings(),
            self.workdir / f"cand-{candidate.id}",
        )
        self._judge(candidate)

    def _lossless(self, recipe: Recipe) -> bool:
        passes = self.plugins.passes
        try:
            return all(
                s.pass_name in passes and passes.get(s.pass_name).is_lossless(self._options(s))
                for s in recipe.steps
            )
        except Exception:  # a bad option or a plugin's bug: the candidate fails when built
            return False

    def _options(self, step: Step) -> dict[str, Any]:
        """``step``'s options resolved by its pass, once per distinct step; passes only
        ever see resolved options. Raises the pass's InputError for a bad option."""
        key = step.label()
        if key not in self._resolved:
            self._resolved[key] = self.plugins.passes.get(step.pass_name).resolve_options(
                step.options
            )
        return self._resolved[key]
