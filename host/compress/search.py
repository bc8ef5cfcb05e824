"""The search: build a candidate per recipe, measure each, fall back per layer, choose one.

:func:`compress` is the library entry point; ``slimfleet compress`` is a thin layer over it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.host import convert
from slimfleet.host.compress import fallback, outdir, report
from slimfleet.host.compress.candidate import (
    ACCEPTED,
    BASELINE,
    FAILED,
    REJECTED,
    SKIPPED,
    Candidate,
    StepRecord,
)
from slimfleet.host.compress.data import Samples, load_samples
from slimfleet.host.compress.evaluate import (
    EvalSettings,
    Outputs,
    compare,
    measure,
    race,
    score_metrics,
    write_samples,
)
from slimfleet.host.compress.modelfile import io_signature, load_model, opset
from slimfleet.host.passes import Pass, PassContext
from slimfleet.host.plugins import Plugins, load_plugins
from slimfleet.host.recipes import Recipe, Step, parse_recipe

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "size")
SLOWER_TOLERANCE = 0.05
"""A candidate up to 5% slower than the original still counts as "not slower" (timing noise)."""
TIE = 0.03
"""Latencies within 3% (sizes within 1%) are a tie, broken by the other figure."""
SIZE_TIE = 0.01
RACE_SIZE = 8
"""Accepted candidates (best on the objective first) re-timed round-robin with the original."""
FALLBACK_SERIES = 2
"""How many quantized candidates that missed the budget get per-layer fallback variants."""
PROBE_SAMPLES = 4
"""Evaluation samples used to rank nodes for fallback."""
EXCLUDE_OPTION = "exclude_nodes"
UPGRADE_PASS = "normalize"
"""The pass (with option ``opset``) run when a pass needs a newer opset than the model's."""

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
    progress: Progress | None = None,
    plugins: Plugins | None = None,
    settings: EvalSettings | None = None,
) -> report.Report:
    """Find the best model inside the fidelity budget and write it with its report.

    ``model_path`` is an ONNX file, or a model a front-end converts first (an
    ``nn.Module``, a fitted estimator, ``module:attr``, a ``.pt``/``.pt2`` file, a
    Paddle inference directory; see :mod:`slimfleet.host.convert`), written as
    ``converted.onnx`` in ``outdir_path`` and checked against the source on ``data``.
    ``outdir_path`` receives ``model.onnx``, ``report.json``, ``report.html`` and
    ``sample.npz``. ``passes`` (``"simplify,quantize_dynamic[op_types=MatMul]"``) runs
    that one recipe instead of every registered one. ``settings`` overrides how
    candidates are measured (its ``threads`` is replaced by ``threads``). Bad input
    raises :class:`InputError`; temp files are removed in every case.
    """
    started = time.monotonic()
    if objective not in OBJECTIVES:
        raise InputError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if not 0 < fidelity <= 1:
        raise InputError(f"fidelity {fidelity}: must be in (0, 1]")
    if threads < 1:
        raise InputError(f"threads {threads}: must be at least 1")
    settings = replace(settings or EvalSettings(), threads=threads)
    plugins = plugins or load_plugins()
    if not convert.is_onnx(model_path):  # a front-end converts it to outdir/converted.onnx
        model_path = convert.convert_to_file(
            model_path, plugins.pm.hook, Path(outdir_path), data=data, input_shapes=input_shapes
        )
    model_path = Path(model_path)
    model = load_model(model_path)
    recipes = _recipes(plugins, passes)
    signature = io_signature(model)
    out = Path(outdir_path)
    created = not out.exists()
    outdir.prepare(out)
    try:
        samples = load_samples(plugins.pm.hook, data, signature["inputs"], input_shapes)
        with tempfile.TemporaryDirectory(prefix="slimfleet-compress-") as tmp:
            search = Search(
                model, model_path, plugins, samples, settings, Path(tmp), fidelity, objective
            )
            search.progress = progress
            search.run(recipes)
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
                    "evaluation": asdict(settings),
                },
                samples=samples,
                elapsed=time.monotonic() - started,
            )
            doc["sections"] = report.sections(plugins.pm.hook, doc)
            assert choice.candidate.path is not None
            report.write(out, doc, choice.candidate.path.read_bytes(), samples.evaluation[0])
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, SlimfleetError) and text:
        return text.splitlines()[0]
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}"


class _StepFailed(Exception):
    """A pass raised; the candidate fails with this one-line reason."""


class Search:
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
        self.candidates: list[Candidate] = []
        self.recipes: dict[int, Recipe] = {}
        self.reference: list[Outputs] = []
        self.progress: Progress | None = None
        self._done = 0
        self._total = 0
        self._prefixes: dict[tuple[str, ...], tuple[onnx.ModelProto, list[StepRecord]]] = {}
        self._shared: set[tuple[str, ...]] = set()
        """Step prefixes that several candidates start with: their models are kept."""
        self._digests: dict[str, int] = {}
        self._missed_budget: set[int] = set()
        self._alone: dict[str, Any] = {}
        """The original's latency measured alone, for candidates that did not race."""
        self._probes = 0

    # -- driving ------------------------------------------------------------------------

    def run(self, recipes: Sequence[Recipe]) -> None:
        """Measure the original and every recipe, add fallback variants of near misses,
        then race the finalists against the original and give the latency verdicts."""
        self._total = len(recipes) + 2
        self._shared = {_key(r.steps[:n]) for r in recipes for n in range(1, len(r.steps))}
        self._measure_original()
        for recipe in recipes:
            self.try_recipe(recipe)
        for candidate in self._fallback_targets():
            self._fall_back(candidate)
        self._race()
        for candidate in self.candidates:
            if candidate.status == ACCEPTED:
                self._judge_latency(candidate)
        if self.progress is not None:
            self.progress(self._total, self._total, "done")

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
        original.size_bytes = self.model_path.stat().st_size
        self.candidates.append(original)
        self._step("measuring the original")
        original.measurement = measure(
            self.model_path, self.sample_paths, self.settings, self.workdir / "cand-0"
        )
        if original.measurement.error:
            raise InputError(
                f"{self.model_path}: onnxruntime cannot run the original model "
                f"({original.measurement.error})"
            )
        self.reference = original.measurement.outputs
        original.measurement.outputs = []
        original.fidelity = compare(self.reference, self.reference)
        original.metrics = score_metrics(self.plugins.metrics, self.reference, self.reference)
        original.status, original.reason = BASELINE, "the reference for every other candidate"
        self._digests[_digest(self.model)] = 0

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
        try:
            model = self._build(recipe.steps, candidate.steps, candidate.id)
        except _StepFailed as exc:
            candidate.status, candidate.reason = FAILED, str(exc)
            return candidate
        digest = _digest(model)
        if digest in self._digests:
            same = self._digests[digest]
            candidate.status = SKIPPED
            candidate.reason = (
                "no pass changed the model" if same == 0 else f"same model as candidate #{same}"
            )
            why = "; ".join(f"{s.pass_name}: {s.notes}" for s in candidate.steps if s.notes)
            if why:
                candidate.reason += f" ({why})"
            return candidate
        self._digests[digest] = candidate.id
        candidate.path = self.workdir / f"candidate-{candidate.id}.onnx"
        onnx.save_model(model, str(candidate.path))
        candidate.size_bytes = candidate.path.stat().st_size
        candidate.measurement = measure(
            candidate.path, self.sample_paths, self.settings, self.workdir / f"cand-{candidate.id}"
        )
        self._judge(candidate)
        return candidate

    def _lossless(self, recipe: Recipe) -> bool:
        passes = self.plugins.passes
        return all(
            s.pass_name in passes
            and (impl := passes.get(s.pass_name)).is_lossless(impl.resolve_options(s.options))
            for s in recipe.steps
        )

    def _build(
        self, steps: Sequence[Step], records: list[StepRecord], candidate_id: int
    ) -> onnx.ModelProto:
        """Apply ``steps`` to the original, reusing models built for shared prefixes."""
        model, start = self.model, 0
        for length in range(len(steps), 0, -1):
            cached = self._prefixes.get(_key(steps[:length]))
            if cached is not None:
                model, done = cached
                records.extend(done)
                start = length
                break
        context = PassContext(
            workdir=self.workdir / f"cand-{candidate_id}" / "work",
            calibration=self.samples.calibration,
            threads=self.settings.threads,
        )
        context.workdir.mkdir(parents=True, exist_ok=True)
        for index in range(start, len(steps)):
            model = self._apply(model, steps[index], records, context)
            if _key(steps[: index + 1]) in self._shared:
                self._prefixes[_key(steps[: index + 1])] = (model, list(records))
        return model

    def _apply(
        self,
        model: onnx.ModelProto,
        step: Step,
        records: list[StepRecord],
        context: PassContext,
    ) -> onnx.ModelProto:
        try:
            pass_ = self.plugins.passes.get(step.pass_name)
            options = pass_.resolve_options(step.options)
        except SlimfleetError as exc:
            records.append(StepRecord(step.pass_name, dict(step.options), "failed", str(exc)))
            raise _StepFailed(str(exc)) from None
        needed = pass_.min_opset(options)
        if needed > opset(model):
            model = self._upgrade(model, needed, pass_.name, records, context)
        reason = pass_.check(model, context, options)
        if reason:
            records.append(StepRecord(pass_.name, options, "skipped", reason))
            return model
        return self._run_pass(pass_, model, options, records, context)

    def _run_pass(
        self,
        pass_: Pass,
        model: onnx.ModelProto,
        options: dict[str, Any],
        records: list[StepRecord],
        context: PassContext,
        auto: bool = False,
    ) -> onnx.ModelProto:
        started = time.perf_counter()
        try:
            result = self.plugins.pm.hook.slimfleet_apply_pass(
                pass_=pass_, model=model, context=context, options=options
            )
            if result is None:
                raise SlimfleetError("no plugin implements slimfleet_apply_pass")
        except Exception as exc:
            reason = f"{pass_.name}: {_one_line(exc)}"
            seconds = time.perf_counter() - started
            records.append(StepRecord(pass_.name, options, "failed", reason, seconds, auto))
            raise _StepFailed(reason) from None
        status = "applied" if result.changed else "unchanged"
        seconds = time.perf_counter() - started
        records.append(StepRecord(pass_.name, options, status, result.notes, seconds, auto))
        log.info("%s: %s %s", pass_.name, status, result.notes)
        return result.model

    def _upgrade(
        self,
        model: onnx.ModelProto,
        needed: int,
        for_pass: str,
        records: list[StepRecord],
        context: PassContext,
    ) -> onnx.ModelProto:
        if UPGRADE_PASS not in self.plugins.passes:
            reason = (
                f"{for_pass} needs opset {needed}, the model has {opset(model)}, and no "
                f"{UPGRADE_PASS!r} pass is registered to upgrade it"
            )
            records.append(StepRecord(for_pass, {}, "failed", reason))
            raise _StepFailed(reason)
        upgrade = self.plugins.passes.get(UPGRADE_PASS)
        options = upgrade.resolve_options({"opset": needed})
        return self._run_pass(upgrade, model, options, records, context, auto=True)

    # -- judging ------------------------------------------------------------------------

    def _judge(self, candidate: Candidate) -> None:
        measurement = candidate.measurement
        assert measurement is not None
        if measurement.error:
            candidate.status, candidate.reason = FAILED, measurement.error
            return
        outputs, measurement.outputs = measurement.outputs, []
        candidate.fidelity = compare(self.reference, outputs)
        try:
            candidate.metrics = score_metrics(self.plugins.metrics, self.reference, outputs)
        except SlimfleetError as exc:
            candidate.status, candidate.reason = FAILED, str(exc)
            return
        fidelity = candidate.fidelity
        low_metrics = {k: v for k, v in candidate.metrics.items() if v < self.budget}
        if fidelity.problem:
            candidate.status, candidate.reason = REJECTED, fidelity.problem
        elif fidelity.score < self.budget:
            worst = min(fidelity.outputs, key=lambda o: o.score)
            candidate.status = REJECTED
            candidate.reason = (
                f"fidelity {fidelity.score:.6g} is below the budget {self.budget} "
                f"(output {worst.name!r}, {worst.judged_by})"
            )
        elif low_metrics:
            name, value = next(iter(low_metrics.items()))
            candidate.status = REJECTED
            candidate.reason = f"task metric {name} {value:.6g} is below the budget {self.budget}"
        else:  # the latency verdict comes after the race
            candidate.status = ACCEPTED
            return
        self._missed_budget.add(candidate.id)

    def _race(self) -> None:
        """Re-time the best accepted candidates round-robin with the original."""
        baseline = self.candidates[0]
        self._alone = dict(baseline.measurement.latency_ms) if baseline.measurement else {}
        accepted = [c for c in self.candidates if c.status == ACCEPTED]
        runners = sorted(accepted, key=self._objective_key)[:RACE_SIZE]
        if not runners:
            self._total -= 1
            return
        self._step(f"timing {len(runners)} finalist(s) against the original, interleaved")
        racers = [baseline, *runners]
        figures = race(
            [c.path for c in racers if c.path],
            self.sample_paths[0],
            self.settings,
            self.workdir / "race",
        )
        if isinstance(figures, str):
            log.warning("latency race failed (%s); using each model's own timing", figures)
            return
        for candidate, latency in zip(racers, figures, strict=True):
            assert candidate.measurement is not None
            candidate.measurement.latency_ms = latency

    def _objective_key(self, candidate: Candidate) -> tuple[float, float]:
        latency, size = candidate.latency_ms or np.inf, candidate.size_bytes or np.inf
        return (latency, size) if self.objective == "latency" else (size, latency)

    def _judge_latency(self, candidate: Candidate) -> None:
        """Reject a candidate slower than the original, timed the same way (raced or alone)."""
        assert candidate.measurement is not None and candidate.fidelity is not None
        baseline = self.candidates[0]
        base = baseline.latency_ms
        if candidate.measurement.latency_ms.get("method") != baseline.measurement.latency_ms.get(
            "method"
        ):
            base = self._alone.get("median")
        mine = candidate.latency_ms or np.inf
        if mine > (base or 0) * (1 + SLOWER_TOLERANCE):
            candidate.status = REJECTED
            candidate.reason = f"slower than the original: {_ms(mine)} vs {_ms(base)}"
            return
        candidate.reason = (
            f"fidelity {candidate.fidelity.score:.6g} within budget; "
            f"latency {_ratio(mine, base)}, "
            f"size {_ratio(candidate.size_bytes, baseline.size_bytes)} of the original"
        )

    # -- per-layer fallback ---------------------------------------------------------------

    def _fallback_targets(self) -> list[Candidate]:
        """Quantized candidates that missed the budget but would otherwise pay off."""
        baseline = self.candidates[0]
        targets = [
            c
            for c in self.candidates
            if c.id in self._missed_budget
            and self._quantize_step(self.recipes[c.id]) is not None
            and (
                (c.latency_ms or 0) < (baseline.latency_ms or 0)
                or (c.size_bytes or 0) < (baseline.size_bytes or 0)
            )
        ]
        targets.sort(key=lambda c: (c.latency_ms or 0, c.size_bytes or 0))
        return targets[:FALLBACK_SERIES]

    def _quantize_step(self, recipe: Recipe) -> int | None:
        """Index of the first step whose pass takes ``exclude_nodes``."""
        for index, step in enumerate(recipe.steps):
            if step.pass_name in self.plugins.passes and any(
                o.name == EXCLUDE_OPTION for o in self.plugins.passes.get(step.pass_name).options
            ):
                return index
        return None

    def _fall_back(self, candidate: Candidate) -> None:
        recipe = self.recipes[candidate.id]
        first = self._quantize_step(recipe)
        assert first is not None and candidate.path is not None
        self._step(f"ranking nodes of #{candidate.id} for fallback", counts=False)
        float_model = self._build(recipe.steps[:first], [], candidate.id) if first else self.model
        ranked = fallback.rank_nodes(float_model, onnx.load(str(candidate.path)), self._probe)
        if not ranked:
            candidate.reason += "; no quantized node could be ranked for per-layer fallback"
            return
        names = [name for name, _ in ranked]
        sizes = fallback.exclusion_sizes(len(names))
        self._total += len(sizes)
        for done, count in enumerate(sizes, 1):
            variant = self.try_recipe(
                _excluding(recipe, names[:count], self.plugins),
                parent=candidate.id,
                excluded=names[:count],
                label=f"{candidate.label} + fallback: {count} node{'s' * (count > 1)} in float",
            )
            if variant.status == SKIPPED:  # the quantizer ignored these exclusions
                continue
            if variant.id not in self._missed_budget:
                self._total -= len(sizes) - done  # met the budget, or failed
                break

    def _probe(self, model: onnx.ModelProto) -> list[Outputs] | None:
        self._probes += 1
        path = self.workdir / f"probe-{self._probes}.onnx"
        onnx.save_model(model, str(path))
        measurement = measure(
            path,
            self.sample_paths[:PROBE_SAMPLES],
            self.settings,
            self.workdir / f"probe-{self._probes}",
            latency=False,
        )
        path.unlink()
        shutil.rmtree(self.workdir / f"probe-{self._probes}", ignore_errors=True)
        if measurement.error:
            log.info("fallback probe failed: %s", measurement.error)
            return None
        return measurement.outputs


def _excluding(recipe: Recipe, names: Sequence[str], plugins: Plugins) -> Recipe:
    """``recipe`` with ``names`` added to ``exclude_nodes`` of every step that takes it."""
    steps = []
    for step in recipe.steps:
        pass_ = plugins.passes.get(step.pass_name)
        if any(o.name == EXCLUDE_OPTION for o in pass_.options):
            kept = list(pass_.resolve_options(step.options)[EXCLUDE_OPTION])
            merged = kept + [n for n in names if n not in kept]
            step = Step(step.pass_name, {**step.options, EXCLUDE_OPTION: merged})
        steps.append(step)
    return Recipe(recipe.name, tuple(steps), recipe.description, recipe.lossy)


def _key(steps: Sequence[Step]) -> tuple[str, ...]:
    return tuple(s.label() for s in steps)


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _ms(value: float | None) -> str:
    return f"{value:.3f} ms" if value is not None and np.isfinite(value) else "n/a"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "n/a"


# -- choosing -------------------------------------------------------------------------------


def _beats(candidate: Candidate, baseline: Candidate, objective: str) -> bool:
    """Better than the original on the objective, or tied on it and better on the other."""
    lat, base_lat = candidate.latency_ms or np.inf, baseline.latency_ms or np.inf
    size, base_size = candidate.size_bytes or np.inf, baseline.size_bytes or np.inf
    faster, smaller = lat < base_lat * (1 - TIE), size < base_size * (1 - SIZE_TIE)
    if objective == "latency":
        return faster or (lat <= base_lat * (1 + TIE) and smaller)
    return smaller or (size <= base_size * (1 + SIZE_TIE) and faster)


def _best(candidates: Sequence[Candidate], objective: str) -> Candidate:
    """Best on the objective; near-ties on it go to the better other figure."""
    if objective == "latency":
        fastest = min(c.latency_ms or np.inf for c in candidates)
        tied = [c for c in candidates if (c.latency_ms or np.inf) <= fastest * (1 + TIE)]
        return min(tied, key=lambda c: (c.size_bytes, c.latency_ms, c.id))
    smallest = min(c.size_bytes or np.inf for c in candidates)
    tied = [c for c in candidates if (c.size_bytes or np.inf) <= smallest * (1 + SIZE_TIE)]
    return min(tied, key=lambda c: (c.latency_ms, c.size_bytes, c.id))


@dataclass(frozen=True)
class Choice:
    """The candidate to ship, why, and whether that means keeping the original."""

    candidate: Candidate
    reason: str
    kept_original: bool


def choose(candidates: Sequence[Candidate], objective: str) -> Choice:
    """Pick from ``candidates``, whose first entry is the original (the baseline).

    Among accepted candidates that beat the original, the best on ``objective``. When
    none beats it: the best lossless accepted candidate (the original, simplified), or
    the original itself.
    """
    baseline = candidates[0]
    accepted = [c for c in candidates if c.status == ACCEPTED]
    winners = [c for c in accepted if _beats(c, baseline, objective)]
    if winners:
        best = _best(winners, objective)
        figure = "fastest" if objective == "latency" else "smallest"
        return Choice(
            best,
            f"{figure} of {len(winners)} candidate{'s' * (len(winners) > 1)} that beat the "
            f"original inside the fidelity budget: latency "
            f"{_ratio(best.latency_ms, baseline.latency_ms)}, size "
            f"{_ratio(best.size_bytes, baseline.size_bytes)} of the original",
            kept_original=False,
        )
    nothing = (
        f"no candidate beat the original on {objective} inside the fidelity budget "
        f"({len(accepted)} accepted, {len(candidates) - 1 - len(accepted)} not)"
    )
    lossless = [c for c in accepted if c.lossless]
    if lossless:
        best = _best(lossless, objective)
        return Choice(
            best, f"{nothing}; keeping the original, simplified losslessly ({best.label})", True
        )
    return Choice(baseline, f"{nothing}; keeping the original model unchanged", True)
