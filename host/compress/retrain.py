"""When the search retrains (accuracy recovery), and what: pure functions.

PaddleSlim ACT's order: quantization-aware training is tried only after the
post-training candidates have missed the budget. :func:`recovery_target` picks the
candidate to retrain; :func:`recovery_recipe` is its recipe with ``quantize_static``
replaced by ``qat`` (which takes the same options, plus ``seconds``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from slimfleet.host.compress.candidate import ACCEPTED, Candidate
from slimfleet.host.recipes import Recipe, Step

RECOVERY_PASS = "qat"
"""The accuracy-recovery pass (``--train-budget``): takes ``quantize_static``'s options."""
STATIC_PASS = "quantize_static"
BUDGETED_PASSES = (RECOVERY_PASS, "prune_refit")
"""Passes that train for their ``seconds`` option (``prune_refit``: distillation after
the refit); named in ``--passes`` without it, they train for ``--train-budget``."""


def recovery_target(
    candidates: list[Candidate],
    missed: Collection[int],
    recipes: Mapping[int, Recipe],
    key: Callable[[Candidate], Any],
) -> Candidate | None:
    """The static int8 candidate to retrain: the best on ``key`` (the objective) among
    those that missed the budget (ids in ``missed``), when it beats the original
    (``candidates[0]``) and every accepted candidate; else None (training cannot win)."""
    baseline = candidates[0]
    pool = [
        c
        for c in candidates
        if c.id in missed
        and c.latency_ms is not None
        and any(s.pass_name == STATIC_PASS for s in recipes[c.id].steps)
        and key(c) < key(baseline)
    ]
    if not pool:
        return None
    best = min(pool, key=key)
    accepted = [key(c) for c in candidates if c.status == ACCEPTED]
    if accepted and min(accepted) <= key(best):
        return None
    return best


def recovery_recipe(
    recipe: Recipe, options: Callable[[Step], dict[str, Any]], seconds: float
) -> Recipe:
    """``recipe`` with each ``quantize_static`` step (its resolved ``options``) run by
    ``qat`` for ``seconds``."""
    steps = tuple(
        Step(RECOVERY_PASS, {**options(s), "seconds": seconds}) if s.pass_name == STATIC_PASS else s
        for s in recipe.steps
    )
    return Recipe(recipe.name, steps, recipe.description, recipe.lossy)


def with_train_budget(recipe: Recipe, seconds: float) -> tuple[Recipe, int]:
    """``recipe`` with ``seconds`` set on each :data:`BUDGETED_PASSES` step that does not
    set it, and how many steps that is (each adds ``seconds`` to the search's time)."""
    given = [s.pass_name in BUDGETED_PASSES and "seconds" not in s.options for s in recipe.steps]
    steps = tuple(
        Step(s.pass_name, {**s.options, "seconds": seconds}) if g else s
        for s, g in zip(recipe.steps, given, strict=True)
    )
    return Recipe(recipe.name, steps, recipe.description, recipe.lossy), sum(given)
