"""smoothquant: the float function kept, input channel ranges moved into the weights, and
dynamic int8 closer to float on inputs whose channels differ in range."""

from __future__ import annotations

import models
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimfleet.host.passes import PassContext
from slimfleet.plugins.quantize_dynamic import QuantizeDynamic
from slimfleet.plugins.smoothquant import SmoothQuant

PASS = SmoothQuant()
DYNAMIC = QuantizeDynamic()


def smooth(model, context, **options):
    return PASS.apply(model, context, PASS.resolve_options(options))


def dynamic(model, context):
    options = {"op_types": "MatMul+Gemm+LSTM", "per_channel": "true"}
    return DYNAMIC.apply(model, context, DYNAMIC.resolve_options(options)).model


def uneven(model, count: int, seed: int, loud=(3, 17, 40), gain: float = 40.0):
    """Samples of the first input (its declared shape, dynamic dims 8) whose channels
    ``loud`` of the last axis are ``gain`` times larger than the rest, as real activations
    often are."""
    value = model.graph.input[0]
    shape = [d.dim_value or 8 for d in value.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.normal(0, 1, shape)
        x[..., list(loud)] *= gain
        feeds.append({value.name: x.astype(np.float32)})
    return feeds


def fan_out(shared_weight: bool = False) -> onnx.ModelProto:
    """x read by two MatMuls (mm_a, mm_b) and a Relu; outputs a, b and r."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (64, 8)).astype(np.float32), "wa")]
    if not shared_weight:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (64, 8)).astype(np.float32), "wb"))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], "relu"),
        helper.make_node("MatMul", ["x", "wa"], ["a"], "mm_a"),
        helper.make_node("MatMul", ["x", "wa" if shared_weight else "wb"], ["b"], "mm_b"),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abr"]
    graph = helper.make_graph(
        nodes,
        "fan_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_registers_and_explains_what_it_cannot_do(plugins, context, tmp_path):
    assert "smoothquant" in plugins("smoothquant").passes
    model = models.mlp()
    options = PASS.resolve_options({})
    assert PASS.check(model, context(), options) == "needs calibration data"
    assert PASS.check(models.add_one(), context(models.add_one()), options) == (
        "no Gemm, LSTM or MatMul nodes"
    )
    bad = PASS.resolve_options({"alpha": "1.5"})
    assert PASS.check(model, context(model), bad) == "alpha must be between 0 and 1, got 1.5"
    branched = read_in_a_branch()
    samples = [{**feed, "c": np.array(True)} for feed in uneven(branched, 2, seed=1)]
    assert PASS.check(branched, PassContext(tmp_path, samples), options) == (
        "no MatMul, Gemm or LSTM node reads data through float32 weights of its own in an "
        "initializer"
    )
    assert PASS.check(model, context(model), options) is None


def test_the_float_model_computes_the_same(tmp_path, helpers):
    cases = {
        "mlp": models.mlp(),
        "gemm": models.gemm(0),
        "gemm_transposed": models.gemm(1),
        "lstm": models.lstm(features=64),
        "bidirectional": models.lstm(features=64, directions=2),
    }
    for label, model in cases.items():
        context = PassContext(workdir=tmp_path / label, calibration=uneven(model, 8, seed=1))
        result = smooth(model, context)
        assert result.changed, label
        assert helpers.ops(result.model)["Mul"] == helpers.ops(model)["Mul"] + (
            1 if label.startswith("gemm") else 2  # mlp and lstm: two layers, two inputs
        ), label
        onnx.checker.check_model(result.model)
        for feed in uneven(model, 3, seed=7):
            for got, want in zip(
                helpers.run(result.model, feed), helpers.run(model, feed), strict=True
            ):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=label)


def test_loud_channels_move_into_the_weights_and_int8_gets_closer(tmp_path, helpers):
    for label, model in {
        "gemm": models.gemm(1),
        "lstm": models.lstm(features=64, directions=2),
    }.items():
        context = PassContext(workdir=tmp_path / label, calibration=uneven(model, 16, seed=1))
        result = smooth(model, context)
        assert "alpha 0.5, 16 samples" in result.notes
        plain, smoothed = dynamic(model, context), dynamic(result.model, context)
        errors = {"plain": [], "smoothed": []}
        for feed in uneven(model, 8, seed=9):
            (want,) = helpers.run(model, feed)
            for name, quantized in (("plain", plain), ("smoothed", smoothed)):
                (got,) = helpers.run(quantized, feed)
                errors[name].append(np.abs(got - want).mean())
        assert np.mean(errors["smoothed"]) < 0.6 * np.mean(errors["plain"]), (label, errors)
        inverse = next(t for t in result.model.graph.initializer if t.name.endswith("_inv"))
        scales = 1 / numpy_helper.to_array(inverse)
        quiet = np.delete(scales, [3, 17, 40])
        assert scales[[3, 17, 40]].min() > 3 * quiet.max(), label


def test_one_division_per_input_and_other_readers_keep_the_original(tmp_path, helpers):
    model = fan_out()
    context = PassContext(workdir=tmp_path, calibration=uneven(model, 4, seed=1))
    result = smooth(model, context)
    assert result.notes.startswith("scaled the input channels of 2 MatMul")
    nodes = {n.name: n for n in result.model.graph.node}
    (mul,) = [n for n in result.model.graph.node if n.op_type == "Mul"]
    assert mul.input[0] == "x" and nodes["mm_a"].input[0] == nodes["mm_b"].input[0] == mul.output[0]
    assert nodes["relu"].input[0] == "x"
    excluded = smooth(model, context, exclude_nodes="mm_b").model
    nodes = {n.name: n for n in excluded.graph.node}
    assert nodes["mm_b"].input[0] == "x" and nodes["mm_a"].input[0] != "x"
    feed = uneven(model, 1, seed=5)[0]
    for got, want in zip(helpers.run(excluded, feed), helpers.run(model, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def read_in_a_branch() -> onnx.ModelProto:
    """MatMul(x, w), and an If whose branches both output w (a subgraph reading it)."""
    weight = np.random.default_rng(2).normal(0, 1, (64, 8)).astype(np.float32)
    w = numpy_helper.from_array(weight, "w")
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["o"])], "b", [], [out])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], "mm"),
        helper.make_node("If", ["c"], ["o"], "if", then_branch=branch, else_branch=branch),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "ao"]
    graph = helper.make_graph(nodes, "branch", inputs, outputs, [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def unrolled() -> onnx.ModelProto:
    """One weight ``w`` read by two MatMuls on different inputs ``a`` and ``b`` (a
    recurrent layer unrolled into a MatMul per step), and ``b`` read by a Relu too."""
    weight = np.random.default_rng(6).normal(0, 0.3, (64, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["ya"], "step_a"),
        helper.make_node("MatMul", ["b", "w"], ["yb"], "step_b"),
        helper.make_node("Relu", ["b"], ["rb"], "relu"),
    ]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, 64]) for x in "ab"]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ya", "yb", "rb")
    ]
    graph = helper.make_graph(
        nodes, "unrolled", inputs, outputs, [numpy_helper.from_array(weight, "w")]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_weight_read_by_several_nodes_takes_one_set_of_scales(tmp_path, helpers):
    for model in (fan_out(shared_weight=True), unrolled()):
        name = model.graph.name
        value = model.graph.input[0].name
        samples = [
            {i.name: feed[value] * (1 + k) for k, i in enumerate(model.graph.input)}
            for feed in uneven(model, 4, seed=1)
        ]
        result = smooth(model, PassContext(workdir=tmp_path / name, calibration=samples))
        muls = [n for n in result.model.graph.node if n.op_type == "Mul"]
        inverses = [t for t in result.model.graph.initializer if t.name.endswith("_inv")]
        assert len(muls) == len(model.graph.input) and len(inverses) == 1, name
        assert {m.input[1] for m in muls} == {inverses[0].name}, name
        scales = 1 / numpy_helper.to_array(inverses[0])
        weight = next(n.input[1] for n in model.graph.node if n.op_type == "MatMul")
        after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
        before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        np.testing.assert_allclose(after[weight], before[weight] * scales[:, None], rtol=1e-6)
        relu = next(n for n in result.model.graph.node if n.op_type == "Relu")
        assert not relu.input[0].endswith("__smoothed"), name  # reads the original
        feed = samples[0]
        for got, want in zip(
            helpers.run(result.model, feed), helpers.run(model, feed), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_weight_read_elsewhere_or_a_dead_channel_is_left_alone(tmp_path, helpers):
    branched = read_in_a_branch()
    samples = [{**feed, "c": np.array(True)} for feed in uneven(branched, 2, seed=1)]
    context = PassContext(workdir=tmp_path, calibration=samples)
    reason = PASS.check(branched, context, PASS.resolve_options({}))
    assert reason is not None and reason.endswith("weights of its own in an initializer")
    model = models.mlp()
    samples = uneven(model, 4, seed=1)
    for feed in samples:
        feed["x"][:, 5] = 0.0  # a channel that never carries anything
    result = smooth(model, PassContext(workdir=tmp_path / "dead", calibration=samples))
    scales = {
        t.name: 1 / numpy_helper.to_array(t)
        for t in result.model.graph.initializer
        if t.name.endswith("_inv")
    }
    first = scales["x__smooth_inv"]
    assert np.all(np.isfinite(first)) and first[5] == 1.0
    feed = samples[0]
    np.testing.assert_allclose(
        helpers.run(result.model, feed)[0], helpers.run(model, feed)[0], rtol=1e-4, atol=1e-4
    )
