"""retrain: the search retrains only the best static int8 candidate that missed the budget."""

from __future__ import annotations

from slimfleet.host.compress.candidate import ACCEPTED, BASELINE, REJECTED
from slimfleet.host.compress.retrain import recovery_recipe, recovery_target, with_train_budget
from slimfleet.host.recipes import Recipe, Step, parse_recipe

STATIC = Recipe("int8_static", (Step("normalize"), Step("quantize_static", {"per_channel": True})))
DYNAMIC = Recipe("int8_dynamic", (Step("quantize_dynamic"),))


def latency(candidate):
    return candidate.latency_ms


def pool(make_candidate, *rows):
    """(latency, status, recipe) rows after an original at 10 ms."""
    candidates = [make_candidate(0, 10.0, 100, BASELINE)]
    recipes = {0: Recipe("original", ())}
    for i, (ms, status, recipe) in enumerate(rows, 1):
        candidates.append(make_candidate(i, ms, 50, status))
        recipes[i] = recipe
    missed = {c.id for c in candidates if c.status == REJECTED}
    return candidates, missed, recipes


def test_the_fastest_static_candidate_that_missed_is_retrained(make_candidate):
    candidates, missed, recipes = pool(
        make_candidate, (4.0, REJECTED, STATIC), (3.0, REJECTED, DYNAMIC), (5.0, REJECTED, STATIC)
    )
    assert recovery_target(candidates, missed, recipes, latency).id == 1


def test_no_retraining_when_an_accepted_candidate_is_as_good(make_candidate):
    candidates, missed, recipes = pool(
        make_candidate, (4.0, REJECTED, STATIC), (4.0, ACCEPTED, DYNAMIC)
    )
    assert recovery_target(candidates, missed, recipes, latency) is None
    candidates[2].measurement.latency_ms["median"] = 6.0  # now slower than the target
    assert recovery_target(candidates, missed, recipes, latency).id == 1


def test_no_retraining_of_a_candidate_slower_than_the_original(make_candidate):
    candidates, missed, recipes = pool(make_candidate, (12.0, REJECTED, STATIC))
    assert recovery_target(candidates, missed, recipes, latency) is None


def test_the_recipe_runs_qat_with_the_static_options_and_the_budget():
    def resolved(step):
        return {**step.options, "calibration": "minmax"}

    recipe = recovery_recipe(STATIC, resolved, 600.0)
    assert [s.pass_name for s in recipe.steps] == ["normalize", "qat"]
    assert recipe.steps[1].options == {
        "per_channel": True,
        "calibration": "minmax",
        "seconds": 600.0,
    }


def test_train_budget_sets_seconds_on_training_steps_named_without_them():
    recipe = parse_recipe("simplify,prune_refit[ratio=0.5],qat[seconds=30],prune_refit")
    budgeted, count = with_train_budget(recipe, 90.0)
    assert count == 2
    assert [s.options for s in budgeted.steps] == [
        {},
        {"ratio": "0.5", "seconds": 90.0},
        {"seconds": "30"},
        {"seconds": 90.0},
    ]


def test_a_bad_train_budget_is_one_line_and_exit_2(slimfleet, mlp_case, tmp_path):
    model, data = mlp_case
    code, _, err = slimfleet(
        "compress", model, "-o", tmp_path / "out", "--data", data, "--train-budget", "soon"
    )
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("--train-budget 'soon': expected a duration such as 90s, 5m, 2h or 7d")
    )
