"""The task metrics the user gives reach the passes, for a loss that follows the task."""

from __future__ import annotations

import models
import numpy as np
import onnx

from slimfleet.host.compress import search
from slimfleet.host.compress.metricspec import parse_metric
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Pass, PassResult
from slimfleet.host.recipes import Recipe, Step


class MetricsEcho(Pass):
    name = "metrics_echo"
    description = "notes the task metrics the search hands its passes"

    def apply(self, model, context, options):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return PassResult(copy, True, f"metrics {sorted(context.metrics.items())}")


class MetricsEchoPlugin:
    @hookimpl
    def slimfleet_add_passes(self, passes):
        passes.add(MetricsEcho())

    @hookimpl
    def slimfleet_add_recipes(self, recipes, passes):
        recipes.add(Recipe("echo", (Step("metrics_echo"),), "notes the metrics"))


def test_passes_see_the_task_metrics_the_user_gave(
    tmp_path, save_model, make_plugins, quick, no_builtin_recipes
):
    """A pass whose loss follows the task (qat, prune_refit) aims at ``--metric``'s
    choice, not at what it would detect."""
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(3)
    np.savez(data, x=rng.normal(size=(40, 1, 64)).astype(np.float32))
    result = search.compress(
        save_model(models.mlp()),
        tmp_path / "out",
        data=data,
        plugins=make_plugins(MetricsEchoPlugin()),
        settings=quick,
        metrics=dict([parse_metric("y=cosine")]),
    )
    (echo,) = [c for c in result.candidates if c["label"] == "echo"]
    assert echo["steps"][0]["notes"] == "metrics [('y', 'cosine')]"
