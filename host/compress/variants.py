"""Variants of candidates that missed the budget: per-layer fallback and accuracy recovery.

A mixin of :class:`~slimfleet.host.compress.search.Search` (it uses the search's
``candidates``, ``recipes``, ``plugins``, ``plan`` and ``try_recipe``). Per-layer
fallback rebuilds up to :data:`FALLBACK_SERIES` quantized near misses with more and more
of their most harmful nodes (ranked in a child process on :data:`PROBE_SAMPLES` samples,
see :mod:`~slimfleet.host.compress.fallback`) left in float; accuracy recovery rebuilds
the best near miss with quantization-aware training (see
:mod:`~slimfleet.host.compress.retrain`). Each variant is one more candidate, judged like
every other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slimfleet.host.compress import fallback, isolation, retrain
from slimfleet.host.compress.building import StepFailed
from slimfleet.host.compress.candidate import SKIPPED, Candidate
from slimfleet.host.compress.planning import batch_bytes
from slimfleet.host.compress.resources import format_bytes
from slimfleet.host.recipes import Recipe, Step

FALLBACK_SERIES = 2
"""How many quantized candidates that missed the budget get per-layer fallback variants."""
PROBE_SAMPLES = 4
"""Evaluation samples used to rank nodes for fallback."""
EXCLUDE_OPTION = "exclude_nodes"


class Variants:
    """The fallback and recovery variants of :class:`~slimfleet.host.compress.search.Search`
    (mixed into it)."""

    def _recover(self) -> None:
        """Try accuracy recovery (PaddleSlim ACT's order: only after the post-training
        candidates missed the budget): the target's recipe with ``quantize_static``
        replaced by ``qat`` for ``train_budget`` seconds, judged like every candidate.
        The training time is added to the time budget and to this candidate's timeout."""
        if not self.train_budget or retrain.RECOVERY_PASS not in self.plugins.passes:
            return
        target = retrain.recovery_target(
            self.candidates, self._missed_budget, self.recipes, self._objective_key
        )
        if target is None:
            return
        recipe = retrain.recovery_recipe(self.recipes[target.id], self._options, self.train_budget)
        self._total += 1
        self.plan.seconds += self.train_budget
        self.plan.candidate_timeout += self.train_budget
        try:
            self.try_recipe(
                recipe,
                parent=target.id,
                excluded=target.excluded_nodes,
                label=f"{target.label} + QAT",
            )
        finally:
            self.plan.candidate_timeout -= self.train_budget

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
        ranked = self._rank(candidate, recipe, first)
        if isinstance(ranked, str):
            candidate.reason += f"; per-layer fallback: {ranked}"
            return
        names = [name for name, _ in ranked]
        sizes = fallback.exclusion_sizes(len(names))
        self._total += len(sizes)
        for done, count in enumerate(sizes, 1):
            variant = self.try_recipe(
                self._excluding(recipe, names[:count]),
                parent=candidate.id,
                excluded=names[:count],
                label=f"{candidate.label} + fallback: {count} node{'s' * (count > 1)} in float",
            )
            if variant.status == SKIPPED and variant.reason.startswith("time budget"):
                self._total -= len(sizes) - done  # the rest would not fit either
                break
            if variant.status == SKIPPED:  # the quantizer ignored these exclusions
                continue
            if variant.id not in self._missed_budget:
                self._total -= len(sizes) - done  # met the budget, or failed
                break

    def _excluding(self, recipe: Recipe, names: Sequence[str]) -> Recipe:
        """``recipe`` with ``names`` added to ``exclude_nodes`` of every step that takes it."""
        steps = []
        for step in recipe.steps:
            pass_ = self.plugins.passes.get(step.pass_name)
            if any(o.name == EXCLUDE_OPTION for o in pass_.options):
                kept = list(self._options(step)[EXCLUDE_OPTION])
                merged = kept + [n for n in names if n not in kept]
                step = Step(step.pass_name, {**step.options, EXCLUDE_OPTION: merged})
            steps.append(step)
        return Recipe(recipe.name, tuple(steps), recipe.description, recipe.lossy)

    def _rank(self, candidate: Candidate, recipe: Recipe, first: int) -> list[Any] | str:
        """The quantized nodes of ``candidate`` ranked by harm (in a child process), or
        why they could not be."""
        baseline = self.candidates[0].measurement
        limits = self.plan.child_limits()
        session = baseline.peak_memory_bytes if baseline and baseline.peak_memory_bytes else 0
        # Two sessions, the two models loaded once more, and at least 1 MiB of tensors.
        need = 2 * session + 2 * self.original_file.path.stat().st_size + (1 << 20)
        if limits.memory is not None and need > limits.memory:
            return (
                f"analysis skipped: two sessions of this model need about {format_bytes(need)}, "
                f"{format_bytes(limits.memory)} is available (--max-memory)"
            )
        over = self.plan.why_not()
        if over:
            return f"analysis skipped: {over}"
        self.plan.start_candidate()  # rebuilding and ranking share one deadline
        try:
            float_model = (
                self._build(recipe.steps[:first], [], candidate.id) if first else self.original_file
            )
            limits = self.plan.child_limits()
            outcome = isolation.call(
                fallback.rank_files,
                float_model.path,
                candidate.path,
                self.sample_paths[:PROBE_SAMPLES],
                self.settings.threads,
                batch_bytes(limits.memory),
                limits=limits,
                workdir=self.workdir / f"rank-{candidate.id}",
            )
        except StepFailed as exc:
            return f"could not rebuild the float model ({exc})"
        finally:
            self.plan.deadline = None
        if not outcome.ok:
            return f"node ranking failed ({outcome.failure})"
        if not outcome.value:
            return "no quantized node could be ranked"
        return outcome.value
