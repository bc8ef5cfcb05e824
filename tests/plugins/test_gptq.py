"""gptq: weights rounded onto quantize_dynamic's int8 grid, closer outputs than rounding."""

from __future__ import annotations

import models
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimfleet.host.passes import PassContext
from slimfleet.plugins.gptq import Gptq, gptq_rows
from slimfleet.plugins.quantize_dynamic import QuantizeDynamic

PASS = Gptq()
DYNAMIC = QuantizeDynamic()


def gptq(model, context, **options):
    return PASS.apply(model, context, PASS.resolve_options(options))


def dynamic(model, context, per_channel="true"):
    options = {"op_types": "MatMul+Gemm+LSTM", "per_channel": per_channel}
    return DYNAMIC.apply(model, context, DYNAMIC.resolve_options(options)).model


def correlated(model, count: int, seed: int, features: int = 64):
    """Samples whose features are strongly correlated (what real activations look like):
    where rounding errors can cancel, which independent features would not show."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(0, 1, (features, features)) * np.geomspace(
        1, 0.01, features
    )
    name = model.graph.input[0].name
    return [
        {name: (rng.normal(0, 1, (8, features)) @ mix.T).astype(np.float32)} for _ in range(count)
    ]


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def dequantized(model) -> dict[str, np.ndarray]:
    """``name -> integers x scales`` of every int8 weight quantize_dynamic wrote, as rows."""
    found = weights(model)
    out = {}
    for name, value in found.items():
        if value.dtype == np.int8 and name.endswith("_quantized"):
            base = name.removesuffix("_quantized")
            scale = found[f"{base}_scale"]
            if value.ndim == 3:  # LSTM: [D, K, 4H], scale [D, 4H]
                out[base] = (value.astype(np.float32) * scale[:, None, :]).transpose(0, 2, 1)
            else:  # MatMul: [K, N], scale [N] or a scalar
                out[base] = value.astype(np.float32) * scale
    return out


def test_registers_and_explains_what_it_cannot_do(plugins, context):
    assert "gptq" in plugins("gptq").passes
    model = models.mlp()
    options = PASS.resolve_options({})
    assert PASS.check(model, context(), options) == "needs calibration data"
    assert PASS.check(models.add_one(), context(models.add_one()), options) == (
        "no Gemm, LSTM or MatMul nodes"
    )
    bad = PASS.resolve_options({"damp": "0"})
    assert PASS.check(model, context(model), bad) == "damp must be > 0, got 0.0"
    assert PASS.check(model, context(model), options) is None


def test_quantize_dynamic_keeps_the_rounded_integers(tmp_path):
    model = models.mlp()
    context = PassContext(workdir=tmp_path, calibration=correlated(model, 16, seed=1))
    rounded = gptq(model, context)
    assert rounded.changed
    assert rounded.notes == "rounded the weights of 2 MatMul onto the int8 grid (16 samples)"
    after = weights(rounded.model)
    for name in ("w1", "w2"):
        rows = after[name].T
        steps = rows / (np.abs(rows).max(axis=1, keepdims=True) / 127)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert not np.allclose(after[name], weights(model)[name])
    quantized = dequantized(dynamic(rounded.model, context))
    for name in ("w1", "w2"):
        np.testing.assert_allclose(quantized[name], after[name], atol=1e-6)


def test_outputs_are_closer_than_rounding_to_nearest(tmp_path, helpers):
    model = models.mlp()
    context = PassContext(workdir=tmp_path, calibration=correlated(model, 32, seed=1))
    plain = dynamic(model, context)
    rounded = dynamic(gptq(model, context).model, context)
    errors = {"plain": [], "gptq": []}
    for feed in correlated(model, 16, seed=2):  # held out
        reference = helpers.run(model, feed)[0]
        for label, candidate in (("plain", plain), ("gptq", rounded)):
            errors[label].append(np.mean((helpers.run(candidate, feed)[0] - reference) ** 2))
    assert np.mean(errors["gptq"]) < 0.7 * np.mean(errors["plain"])


def test_gemm_in_both_layouts_gets_its_bias_corrected(tmp_path, helpers):
    for trans_b in (0, 1):
        model = models.gemm(trans_b)
        samples = correlated(model, 16, seed=1)
        context = PassContext(workdir=tmp_path / str(trans_b), calibration=samples)
        corrected = gptq(model, context)
        uncorrected = gptq(model, context, bias_correction="false")
        assert not np.allclose(weights(corrected.model)["b"], weights(model)["b"])
        np.testing.assert_array_equal(weights(uncorrected.model)["b"], weights(model)["b"])
        mean_error = {}
        for label, result in (("on", corrected), ("off", uncorrected)):
            diffs = [
                helpers.run(result.model, feed)[0] - helpers.run(model, feed)[0] for feed in samples
            ]
            mean_error[label] = np.abs(np.mean(diffs, axis=(0, 1))).mean()
        assert mean_error["on"] < mean_error["off"]
        quantized = dequantized(dynamic(corrected.model, context))
        rows = weights(corrected.model)["w"]
        key = "w_Transposed" if trans_b else "w"
        np.testing.assert_allclose(quantized[key], rows.T if trans_b else rows, atol=1e-6)


def test_a_scaled_gemm_is_left_to_the_quantizer(tmp_path):
    model = models.gemm(1)
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 0.5))
    context = PassContext(workdir=tmp_path, calibration=correlated(model, 4, seed=1))
    reason = PASS.check(model, context, PASS.resolve_options({}))
    assert reason == "no MatMul, Gemm or LSTM node has float32 weights in an initializer"


def bidirectional_lstm(named_y: bool) -> onnx.ModelProto:
    """A bidirectional LSTM whose Y may be unused (only Y_h read), then a MatMul head."""
    rng = np.random.default_rng(8)
    hidden, features = 16, 64
    inits = [
        numpy_helper.from_array(
            rng.normal(0, 0.3, (2, 4 * hidden, features)).astype(np.float32), "W"
        ),
        numpy_helper.from_array(
            rng.normal(0, 0.3, (2, 4 * hidden, hidden)).astype(np.float32), "R"
        ),
        numpy_helper.from_array(rng.normal(0, 0.1, (2, 8 * hidden)).astype(np.float32), "B"),
        numpy_helper.from_array(rng.normal(0, 0.3, (hidden, 5)).astype(np.float32), "head"),
    ]
    outputs = ["Y" if named_y else "", "Yh"]
    nodes = [
        helper.make_node(
            "LSTM",
            ["seq", "W", "R", "B"],
            outputs,
            "lstm",
            hidden_size=hidden,
            direction="bidirectional",
        ),
        helper.make_node("MatMul", ["Yh", "head"], ["out"], "head_mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [8, 1, features])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 1, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_lstm_weights_of_both_directions_round_even_when_y_is_unused(tmp_path, helpers):
    model = bidirectional_lstm(named_y=False)
    samples = [{"seq": s["seq"].reshape(8, 1, 64)} for s in correlated(model, 12, seed=1)]
    context = PassContext(workdir=tmp_path, calibration=samples)
    rounded = gptq(model, context)
    assert rounded.notes == (
        "rounded the weights of 1 LSTM, 1 MatMul onto the int8 grid (12 samples)"
    )
    assert [o.name for o in rounded.model.graph.output] == ["out"]
    assert rounded.model.graph.node[0].output[0] == "lstm__Y"
    before, after = weights(model), weights(rounded.model)
    assert not np.allclose(after["R"], before["R"]) and not np.allclose(after["B"], before["B"])
    quantized = dequantized(dynamic(rounded.model, context))
    np.testing.assert_allclose(quantized["W"], after["W"], atol=1e-6)
    np.testing.assert_allclose(quantized["R"], after["R"], atol=1e-6)
    feed = samples[0]
    assert helpers.cosine(helpers.run(rounded.model, feed)[0], helpers.run(model, feed)[0]) > 0.99


def test_per_tensor_rounds_onto_one_grid(tmp_path):
    model = models.mlp()
    context = PassContext(workdir=tmp_path, calibration=correlated(model, 8, seed=1))
    after = weights(gptq(model, context, per_channel="false").model)["w1"]
    steps = after / (np.abs(after).max() / 127)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    quantized = dequantized(
        dynamic(gptq(model, context, per_channel="false").model, context, "false")
    )
    np.testing.assert_allclose(quantized["w1"], after, atol=1e-6)


def test_rounding_keeps_each_rows_largest_weight_and_handles_dead_inputs():
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 1, (6, 20))
    x = rng.normal(0, 1, (200, 20))
    x[:, 3] = 0  # an input that is always zero
    out = gptq_rows(rows, x.T @ x, damp=0.01)
    peak = np.abs(rows).argmax(axis=1)
    np.testing.assert_array_equal(out[np.arange(6), peak], rows[np.arange(6), peak])
    steps = out / (np.abs(rows).max(axis=1, keepdims=True) / 127)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert np.all(np.abs(np.round(steps)) <= 127)


def test_a_weight_shared_by_several_nodes_is_rounded_once_for_all_their_inputs(tmp_path, helpers):
    """An RNN unrolled into a Gemm per step shares one weight: GPTQ rounds it once, from
    the inputs of every node reading it, and all those outputs get closer."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (64, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", [x, "w"], [f"y{x}"], f"mm_{x}") for x in ("a", "b")]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [8, 64]) for x in ("a", "b")]
    outputs = [helper.make_tensor_value_info(f"y{x}", TensorProto.FLOAT, None) for x in "ab"]
    graph = helper.make_graph(nodes, "shared", inputs, outputs, [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    def samples(count, seed):
        first = correlated(model, count, seed)
        second = correlated(model, count, seed + 100)
        return [
            {"a": f["a"], "b": 0.5 * g["a"][:, ::-1].copy()}
            for f, g in zip(first, second, strict=True)
        ]

    context = PassContext(workdir=tmp_path, calibration=samples(32, 1))
    rounded = gptq(model, context)
    assert rounded.notes == "rounded the weights of 2 MatMul onto the int8 grid (32 samples)"
    after = weights(rounded.model)["w"]
    np.testing.assert_allclose(dequantized(dynamic(rounded.model, context))["w"], after, atol=1e-6)
    plain, shared = dynamic(model, context), dynamic(rounded.model, context)
    errors = {"plain": np.zeros(2), "gptq": np.zeros(2)}
    for feed in samples(16, 2):  # held out
        reference = helpers.run(model, feed)
        for label, candidate in (("plain", plain), ("gptq", shared)):
            got = helpers.run(candidate, feed)
            errors[label] += [np.mean((g - r) ** 2) for g, r in zip(got, reference, strict=True)]
    assert np.all(errors["gptq"] < errors["plain"]), errors
    assert errors["gptq"].sum() < 0.8 * errors["plain"].sum(), errors
