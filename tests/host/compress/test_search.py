from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import judging, search
from slimfleet.host.compress.candidate import (
    ACCEPTED,
    BASELINE,
    FAILED,
    REJECTED,
    SKIPPED,
)
from slimfleet.host.compress.evaluate import Measurement
from slimfleet.host.compress.fidelity import Fidelity
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.metrics import Metric
from slimfleet.host.passes import Option, Pass, PassResult
from slimfleet.host.recipes import Recipe, Step

RNG = np.random.default_rng(11)
STATUSES = {BASELINE, ACCEPTED, REJECTED, FAILED, SKIPPED}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _map_weights(model: onnx.ModelProto, change) -> onnx.ModelProto:
    out = _copy(model)
    for init in out.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(change(array).astype(np.float32), init.name))
    return out


class Noise(Pass):
    name = "noise"
    description = "add Gaussian noise to every float weight (lossy on purpose)"
    options = (Option("scale", float, 0.01, "standard deviation"),)

    def apply(self, model, context, options):
        rng = np.random.default_rng(0)
        noisy = _map_weights(model, lambda a: a + rng.normal(0, options["scale"], a.shape))
        return PassResult(noisy, True, f"noise {options['scale']}")


class NaNWeights(Pass):
    name = "nan_weights"
    description = "turn every float weight into NaN"

    def apply(self, model, context, options):
        return PassResult(_map_weights(model, lambda a: np.full_like(a, np.nan)), True, "NaN")


class Explode(Pass):
    name = "explode"
    description = "raises"

    def apply(self, model, context, options):
        raise RuntimeError("boom\nwith a second line")


class NotHere(Pass):
    name = "not_here"
    description = "never applies"

    def check(self, model, context, options):
        return "no Frobnicate nodes"

    def apply(self, model, context, options):
        raise AssertionError("check() said no")


class NeedsOpset17(Pass):
    name = "needs_opset17"
    description = "a pass that needs a newer opset than the test models'"

    def min_opset(self, options):
        return 17

    def apply(self, model, context, options):
        out = _copy(model)
        out.doc_string = "touched"
        return PassResult(out, True, f"ran on opset {out.opset_import[0].version}")


class TestPasses:
    @hookimpl
    def slimfleet_add_passes(self, passes):
        for p in (Noise(), NaNWeights(), Explode(), NotHere(), NeedsOpset17()):
            passes.add(p)


class TestRecipes:
    @hookimpl
    def slimfleet_add_recipes(self, recipes, passes):
        for name, steps in {
            "noisy": (Step("noise", {"scale": 5.0}),),
            "noisy_again": (Step("noise", {"scale": 5.0}), Step("not_here")),
            "nan": (Step("nan_weights"),),
            "explodes": (Step("noise", {"scale": 0.001}), Step("explode")),
            "nothing": (Step("not_here"),),
            "opset": (Step("needs_opset17"),),
        }.items():
            recipes.add(Recipe(name, steps, f"test recipe {name}"))


def _mlp_data(tmp_path, count: int = 40):
    """Samples for the MLP; 20 of them evaluate, so chance argmax agreement cannot pass."""
    path = tmp_path / "data.npz"
    np.savez(path, x=RNG.normal(size=(count, 1, 64)).astype(np.float32))
    return path


def test_every_outcome_is_a_row(tmp_path, save_model, make_plugins, quick, no_builtin_recipes):
    plugins = make_plugins(TestPasses(), TestRecipes())
    assert {r.name for r in plugins.recipes} == {
        "noisy", "noisy_again", "nan", "explodes", "nothing", "opset"
    }  # fmt: skip
    result = search.compress(
        save_model(models.mlp()),
        tmp_path / "out",
        data=_mlp_data(tmp_path),
        plugins=plugins,
        settings=quick,
    )
    rows = {c["label"]: c for c in result.candidates}
    assert {c["status"] for c in result.candidates} <= STATUSES
    assert rows["(original)"]["status"] == BASELINE

    assert rows["noisy"]["status"] == REJECTED
    assert rows["noisy"]["reason"].startswith("fidelity ")
    assert "below the budget 0.99" in rows["noisy"]["reason"]

    assert rows["noisy_again"]["status"] == SKIPPED
    assert rows["noisy_again"]["reason"].startswith(
        f"same model as candidate #{rows['noisy']['id']}"
    )
    skipped_step = dict(rows["noisy_again"]["steps"][1])
    assert skipped_step.pop("seconds") >= 0  # check() ran in the pass's own process
    assert skipped_step == {
        "pass": "not_here",
        "options": {},
        "status": "skipped",
        "notes": "no Frobnicate nodes",
        "auto": False,
    }

    assert rows["nan"]["status"] == REJECTED
    assert rows["nan"]["reason"] == "output 'y' contains NaN or Inf (sample 0)"

    assert rows["explodes"]["status"] == FAILED
    assert rows["explodes"]["reason"] == "explode: RuntimeError: boom"
    assert [s["status"] for s in rows["explodes"]["steps"]] == ["applied", "failed"]

    assert rows["nothing"]["status"] == SKIPPED
    assert rows["nothing"]["reason"] == "no pass changed the model (not_here: no Frobnicate nodes)"

    upgrade, needs = rows["opset"]["steps"]
    assert (upgrade["pass"], upgrade["auto"], upgrade["options"]) == (
        "normalize",
        True,
        {"opset": 17},
    )
    assert "opset 13 -> 17" in upgrade["notes"]
    assert needs["notes"] == "ran on opset 17"
    assert rows["opset"]["status"] in (ACCEPTED, REJECTED)  # lossless; timing decides

    for row in rows.values():
        if row["status"] in (ACCEPTED, REJECTED) or row["id"] == 0:
            assert row["size_bytes"] > 0 and row["latency_ms"]["median"] > 0
            assert row["peak_memory_bytes"] > 0 and row["load_ms"] > 0
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["candidates"] == result.candidates


def test_nothing_beats_the_original_so_it_is_kept(tmp_path, save_model, make_plugins, quick):
    path = save_model(models.mlp())
    result = search.compress(
        path,
        tmp_path / "out",
        data=_mlp_data(tmp_path),
        passes="noise[scale=5]",
        plugins=make_plugins(TestPasses()),
        settings=quick,
    )
    assert [c["status"] for c in result.candidates] == [BASELINE, REJECTED]
    assert result.summary["kept_original"] is True
    assert result.summary["chosen"] == "(original)" and result.summary["size_ratio"] == 1.0
    assert result.data["choice"]["reason"].startswith("no candidate beat the original")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == path.read_bytes()


def test_fallback_keeps_the_harmful_node_in_float(
    tmp_path, save_model, make_plugins, quick, outlier_mlp
):
    data = tmp_path / "data.npz"
    np.savez(data, x=RNG.normal(size=(16, 8, 64)).astype(np.float32))
    result = search.compress(
        save_model(outlier_mlp),
        tmp_path / "out",
        data=data,
        passes="quantize_dynamic",
        fidelity=0.9,
        plugins=make_plugins(),
        settings=quick,
    )
    _, quantized, variant = result.candidates
    assert quantized["status"] == REJECTED and "below the budget 0.9" in quantized["reason"]
    assert variant["parent"] == quantized["id"]
    assert variant["excluded_nodes"] == ["mm2"]
    assert variant["label"] == "quantize_dynamic + fallback: 1 node in float"
    assert variant["steps"][0]["options"]["exclude_nodes"] == ["mm2"]
    assert variant["fidelity"]["score"] >= 0.9 > quantized["fidelity"]["score"]


class ExactMetric:
    """A task metric: 1 when every output equals the original's to 1e-6, else 0."""

    @hookimpl
    def slimfleet_add_metrics(self, metrics):
        def exact(reference, candidate):
            return float(
                all(
                    np.allclose(r[k], c[k], atol=1e-6, rtol=0)
                    for r, c in zip(reference, candidate, strict=True)
                    for k in r
                )
            )

        metrics.add(Metric("exact", "outputs equal the original's", exact))


def test_a_task_metric_is_reported_and_can_reject(tmp_path, save_model, make_plugins, quick):
    result = search.compress(
        save_model(models.mlp()),
        tmp_path / "out",
        data=_mlp_data(tmp_path),
        passes="noise[scale=0.01]",
        fidelity=0.5,
        plugins=make_plugins(TestPasses(), ExactMetric()),
        settings=quick,
    )
    original, noisy = result.candidates
    assert original["metrics"] == {"exact": 1.0}
    assert noisy["metrics"] == {"exact": 0.0}
    assert noisy["status"] == REJECTED
    assert noisy["reason"] == "task metric exact 0 is below the budget 0.5"


class PassSpy:
    """Wraps every pass application (``wrapper=True``), as a timing plugin would.

    Passes run in child processes, so what it sees goes to a file, not to memory.
    """

    def __init__(self, log: Path) -> None:
        self.log = log

    @hookimpl(wrapper=True)
    def slimfleet_apply_pass(self, pass_, model, context, options):
        result = yield
        with self.log.open("a") as out:
            out.write(json.dumps([pass_.name, result.notes]) + "\n")
        return result

    def seen(self) -> list[tuple[str, str]]:
        return [tuple(json.loads(line)) for line in self.log.read_text().splitlines()]


def test_an_apply_pass_wrapper_sees_every_pass(tmp_path, save_model, make_plugins, quick):
    spy = PassSpy(tmp_path / "spy.jsonl")
    search.compress(
        save_model(models.mlp()),
        tmp_path / "out",
        data=_mlp_data(tmp_path),
        passes="noise[scale=0.001],needs_opset17",
        plugins=make_plugins(TestPasses(), spy),
        settings=quick,
    )
    names = [name for name, _ in spy.seen()]
    assert names == ["noise", "normalize", "needs_opset17"]  # the upgrade is a pass too
    assert spy.seen()[2][1] == "ran on opset 17"


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ("nope", "unknown pass 'nope'"),
        ("noise[sigma=1]", "pass noise: unknown option 'sigma' (options: scale)"),
        ("noise[scale=big]", "pass noise: option scale='big' is not a float"),
        ("noise[scale=1", "missing ']'"),
    ],
)
def test_bad_passes_fail_before_any_work(tmp_path, save_model, make_plugins, passes, message):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(message)):
        search.compress(
            save_model(models.mlp()), out, passes=passes, plugins=make_plugins(TestPasses())
        )
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "speed"}, "objective 'speed': choose one of latency, size"),
        ({"fidelity": 0.0}, "fidelity 0.0: must be in"),
        ({"fidelity": 1.5}, "fidelity 1.5: must be in"),
        ({"threads": 0}, "threads 0: must be at least 1"),
    ],
)
def test_bad_settings(tmp_path, save_model, kwargs, message):
    with pytest.raises(InputError, match=message):
        search.compress(save_model(models.mlp()), tmp_path / "out", **kwargs)


def test_temp_files_go_away_after_success_and_failure(
    tmp_path, save_model, make_plugins, quick, monkeypatch, unrunnable
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    plugins = make_plugins(TestPasses())
    search.compress(
        save_model(models.mlp()),
        tmp_path / "ok",
        data=_mlp_data(tmp_path),
        passes="noise[scale=0.001]",
        plugins=plugins,
        settings=quick,
    )
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "model.onnx", "report.html", "report.json", "sample.npz"
    ]  # fmt: skip
    with pytest.raises(InputError, match="onnxruntime cannot run the original model") as info:
        search.compress(
            save_model(unrunnable, "bad.onnx"),
            tmp_path / "bad",
            passes="noise",
            plugins=plugins,
            settings=quick,
        )
    assert "\n" not in str(info.value)
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "bad").exists()


def test_progress_is_reported_to_the_end(tmp_path, save_model, make_plugins, quick):
    seen: list[tuple[int, int, str]] = []
    search.compress(
        save_model(models.mlp()),
        tmp_path / "out",
        data=_mlp_data(tmp_path),
        passes="noise[scale=0.001]",
        plugins=make_plugins(TestPasses()),
        settings=quick,
        progress=lambda done, total, label: seen.append((done, total, label)),
    )
    assert seen[0] == (0, 3, "measuring the original")
    assert seen[1][2] == "noise[scale=0.001]"
    assert seen[-1] == (3, 3, "done")
    assert [done for done, _, _ in seen] == sorted(done for done, _, _ in seen)


def test_the_builtin_search_end_to_end(tmp_path, save_model, make_plugins):
    """Every built-in recipe becomes a row; whatever is chosen runs and keeps the budget."""
    data = tmp_path / "data.npz"
    np.savez(data, input=RNG.random((8, 1, 3, 32, 32)).astype(np.float32))
    plugins = make_plugins()
    result = search.compress(
        save_model(models.conv_bn_net()),
        tmp_path / "out",
        data=data,
        plugins=plugins,
        settings=search.EvalSettings.quick(),
    )
    recipes = {c["recipe"] for c in result.candidates if c["parent"] is None}
    assert recipes == {"original"} | {r.name for r in plugins.recipes}
    assert {c["status"] for c in result.candidates} <= STATUSES
    summary = result.summary
    assert summary["fidelity"] >= 0.99
    assert summary["latency_ratio"] <= 1 + judging.SLOWER_TOLERANCE
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    with np.load(tmp_path / "out" / "sample.npz") as sample:
        (logits,) = session.run(None, {"input": sample["input"]})
    assert logits.shape == (1, 10)


def test_latency_verdict_without_a_timed_original_is_a_reason_not_a_crash(make_candidate):
    _cand = make_candidate
    # The original's latency could not be measured: the verdict must still be a sentence.
    baseline = _cand(0, 10.0, 1000, BASELINE)
    baseline.measurement = Measurement(latency_ms={})
    candidate = _cand(1, 5.0, 500)
    candidate.fidelity = Fidelity()
    judge = SimpleNamespace(candidates=[baseline], _alone={})
    search.Search._judge_latency(judge, candidate)
    assert candidate.status == REJECTED
    assert candidate.reason == "slower than the original: 5 ms vs n/a"


class BuggyCheck(Pass):
    name = "buggy_check"
    description = "a plugin whose check() and min_opset() raise"
    options = (Option("where", str, "check", "which method raises"),)

    def min_opset(self, options):
        if options["where"] == "min_opset":
            raise KeyError("opset")
        return 1

    def check(self, model, context, options):
        raise ZeroDivisionError("division by zero")

    def apply(self, model, context, options):
        raise AssertionError("never reached")


class BuggyPlugin:
    @hookimpl
    def slimfleet_add_passes(self, passes):
        passes.add(BuggyCheck())

    @hookimpl
    def slimfleet_add_recipes(self, recipes, passes):
        recipes.add(Recipe("bad_check", (Step("buggy_check"),), "check raises"))
        recipes.add(Recipe("bad_opset", (Step("buggy_check", {"where": "min_opset"}),), "x"))
        recipes.add(Recipe("fine", (Step("noise", {"scale": 1e-6}),), "still measured"))


def test_a_pass_whose_check_raises_fails_its_candidate_not_the_search(
    tmp_path, save_model, make_plugins, quick, no_builtin_recipes
):
    plugins = make_plugins(TestPasses(), BuggyPlugin())
    result = search.compress(
        save_model(models.mlp()),
        tmp_path / "out",
        data=_mlp_data(tmp_path),
        plugins=plugins,
        settings=quick,
    )
    rows = {c["label"]: c for c in result.candidates}
    assert rows["bad_check"]["status"] == FAILED
    assert rows["bad_check"]["reason"] == (
        "buggy_check: check raised ZeroDivisionError: division by zero"
    )
    assert rows["bad_opset"]["reason"] == "buggy_check: min_opset raised KeyError: 'opset'"
    assert rows["fine"]["status"] in (ACCEPTED, REJECTED)
