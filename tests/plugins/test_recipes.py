"""The built-in recipes: registered through the hook, valid, and runnable end to end."""

from __future__ import annotations

import models
import numpy as np
import onnx

from slimfleet.host.compress.modelfile import opset
from slimfleet.host.passes import PassContext
from slimfleet.host.plugins import Plugins
from slimfleet.host.recipes import Recipe
from slimfleet.plugins.normalize import upgrade_opset

PASS_MODULES = (
    "normalize",
    "simplify",
    "ortopt",
    "quantize_dynamic",
    "smoothquant",
    "gptq",
    "quantize_static",
    "fp16",
    "prune",
    "recipes",
    "runpass",
)


def run_recipe(
    plugins: Plugins, recipe: Recipe, model: onnx.ModelProto, context: PassContext
) -> tuple[onnx.ModelProto, list[str]]:
    """Apply a recipe the way a runner does: upgrade, check, apply through the hook."""
    notes = []
    for step in recipe.steps:
        pass_ = plugins.passes.get(step.pass_name)
        options = pass_.resolve_options(step.options)
        if pass_.min_opset(options) > opset(model):
            model = upgrade_opset(model, pass_.min_opset(options))
        reason = pass_.check(model, context, options)
        if reason:
            notes.append(f"{pass_.name} skipped: {reason}")
            continue
        result = plugins.pm.hook.slimfleet_apply_pass(
            pass_=pass_, model=model, context=context, options=options
        )
        model = result.model
        notes.append(f"{pass_.name}: {result.notes}")
    return model, notes


def test_every_recipe_names_registered_passes_with_valid_options(plugins):
    loaded = plugins(*PASS_MODULES)
    names = {r.name for r in loaded.recipes}
    assert names == {
        "lossless",
        "int8_dynamic",
        "int8_dynamic_matmul",
        "int8_dynamic_smooth_gptq",
        "int8_dynamic_gptq",
        "int8_static",
        "int8_combined",
        "int8_combined_heavy",
        "fp16",
    }
    for recipe in loaded.recipes:
        assert loaded.recipes.plugin_of(recipe.name) == "slimfleet.plugins.recipes"
        for step in recipe.steps:
            loaded.passes.get(step.pass_name).resolve_options(step.options)
    lossless = loaded.recipes.get("lossless")
    assert not lossless.lossy
    assert all(loaded.passes.get(s.pass_name).lossless for s in lossless.steps)


def test_recipes_with_missing_passes_are_left_out(plugins):
    loaded = plugins("normalize", "simplify", "ortopt", "fp16", "recipes")
    assert {r.name for r in loaded.recipes} == {"lossless", "fp16"}


def test_lossless_recipe_matches_the_original(plugins, context, helpers):
    loaded = plugins(*PASS_MODULES)
    model = models.conv_bn_net(opset=12)
    out, _ = run_recipe(loaded, loaded.recipes.get("lossless"), model, context(model))
    for feed in helpers.feeds(model, 2):
        np.testing.assert_allclose(
            helpers.run(out, feed)[0], helpers.run(model, feed)[0], rtol=1e-4, atol=1e-5
        )


def test_combined_recipe_mixes_qdq_and_dynamic_int8_that_onnxruntime_runs(
    plugins, context, helpers
):
    loaded = plugins(*PASS_MODULES)
    model = models.conv_bn_net(opset=12)
    out, notes = run_recipe(loaded, loaded.recipes.get("int8_combined"), model, context(model))
    counts = helpers.ops(out)
    assert counts["QuantizeLinear"] > 0 and counts["MatMulInteger"] == 1
    assert notes[-1].startswith("quantize_dynamic: quantized 1 Gemm")
    assert opset(out) == 13
    for feed in helpers.feeds(model, 3, seed=9):
        assert helpers.cosine(helpers.run(out, feed)[0], helpers.run(model, feed)[0]) > 0.98


def test_combined_recipe_on_an_lstm_quantizes_it_dynamically(plugins, context, helpers):
    loaded = plugins(*PASS_MODULES)
    model = models.lstm()
    out, notes = run_recipe(loaded, loaded.recipes.get("int8_combined"), model, context(model))
    assert helpers.ops(out)["DynamicQuantizeLSTM"] == 1
    assert notes[2] == (
        "quantize_static skipped: none of the 14 op types to quantize (Add, AveragePool, "
        "Clip, ...) is in the model"
    )
    feed = helpers.feeds(model, 1, seed=9)[0]
    assert helpers.cosine(helpers.run(out, feed)[0], helpers.run(model, feed)[0]) > 0.98


def embedding_model() -> onnx.ModelProto:
    """Token ids -> a 1000x64 embedding table (Gather) -> MatMul head."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], "embed"),
            helper.make_node("MatMul", ["emb", "head"], ["out"], "head_mm"),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 8])],
        [
            numpy_helper.from_array(rng.normal(0, 1, (1000, 64)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.normal(0, 0.2, (64, 8)).astype(np.float32), "head"),
        ],
    )
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_dynamic_recipe_stores_an_embedding_table_in_int8(plugins, context, helpers):
    loaded = plugins(*PASS_MODULES)
    model = embedding_model()
    ctx = context()
    out, notes = run_recipe(loaded, loaded.recipes.get("int8_dynamic_matmul"), model, ctx)
    assert (
        notes[-1]
        == "quantize_dynamic: quantized 1 Gather, 1 MatMul (dynamic, int8 weights, per channel)"
    )
    assert out.ByteSize() < model.ByteSize() * 0.3
    feed = {"ids": np.random.default_rng(1).integers(0, 1000, (1, 16)).astype(np.int64)}
    assert helpers.cosine(helpers.run(out, feed)[0], helpers.run(model, feed)[0]) > 0.99
