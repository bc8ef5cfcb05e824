"""Static int8 keeps float what a cancelling difference and a reciprocal read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from slimfleet.host.compress.modelfile import with_outputs
from slimfleet.plugins import quantize_static
from slimfleet.plugins.precision import cancellation_regions, cancelling_nodes, singular_chains
from tests import models

PASS = quantize_static.QuantizeStatic()
VARIANCE_TERMS = {"h2", "sum2", "mean2", "sum", "mean", "mean_sq"}
"""What the moments LayerNorm computes between ``h`` and ``E[h^2] - E[h]^2``."""


def _quantized(context, model, *, rules: bool, monkeypatch):
    if not rules:
        monkeypatch.setattr(quantize_static, "cancelling_nodes", lambda *args: [])
        monkeypatch.setattr(quantize_static, "singular_chains", lambda model: set())
    ctx = context()
    ctx.calibration = models.row_feeds(16, seed=1)
    return PASS.apply(model, ctx, PASS.resolve_options({}))


def _errors(helpers, model, quantized) -> tuple[float, float]:
    """The median relative error of the variance and the median largest score error,
    over held-out samples."""
    variance, scores = [], []
    for feed in models.row_feeds(12, seed=2):
        want = helpers.run(with_outputs(model, ["var_raw"]), feed)
        got = helpers.run(with_outputs(quantized, ["var_raw"]), feed)
        scores.append(float(np.abs(want[0] - got[0]).max()))
        variance.append(float(np.median(np.abs(got[1] - want[1]) / want[1])))
    return float(np.median(variance)), float(np.median(scores))


def test_a_variance_as_a_difference_of_moments_is_computed_in_float(context, helpers, monkeypatch):
    """Rows whose mean is 16x their spread: ``E[h^2]`` and ``E[h]^2`` rounded at their own
    8-bit steps leave the variance wrong by half itself, and the scores with it."""
    model = models.moments_layer_norm()
    result = _quantized(context, model, rules=True, monkeypatch=monkeypatch)
    assert "they feed 1 difference, each 16x or more smaller than its terms" in result.notes
    quantized_inputs = {
        n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"
    }
    assert not VARIANCE_TERMS & quantized_inputs
    assert {"x", "h", "normed"} <= quantized_inputs  # the rest stays int8
    variance, scores = _errors(helpers, model, result.model)

    before = _quantized(context, model, rules=False, monkeypatch=monkeypatch)
    lost_variance, lost_scores = _errors(helpers, model, before.model)
    assert variance < 0.05 < 0.2 < lost_variance
    assert scores < lost_scores / 2


def test_the_region_stops_where_both_terms_meet():
    model = models.moments_layer_norm()
    (variance,) = cancelling_nodes(model, models.row_feeds(4, seed=1))
    assert variance.name == "ln_variance"
    assert cancellation_regions(model, [variance]) == [VARIANCE_TERMS]  # not h, nor above it


def test_a_residual_add_and_a_bias_are_not_cancellations():
    model = models.moments_layer_norm()
    names = {n.name for n in cancelling_nodes(model, models.row_feeds(4, seed=1))}
    assert "bias_out" not in names  # a constant term
    assert "ln_centre" not in names  # h - mean: about as large as h on rows near 0


def _graph(nodes, inputs=("a", "b"), initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_divisor_chain_goes_up_through_one_operand_ops_to_what_a_reduction_made():
    model = models.moments_layer_norm()
    # up from the Reciprocal: Sqrt, the eps Add and the Max clip, to the Sub that made it
    assert singular_chains(model) == {"std", "var_eps", "var", "var_raw"}


def test_divisors_of_div_and_negative_pow_but_not_constants_or_squares():
    half = onnx.numpy_helper.from_array(np.array(-0.5, np.float32), "minus_half")
    two = onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")
    three = onnx.numpy_helper.from_array(np.array(3.0, np.float32), "three")
    model = _graph(
        [
            helper.make_node("Mul", ["a", "b"], ["ab"]),
            helper.make_node("Abs", ["ab"], ["d"]),
            helper.make_node("Div", ["a", "d"], ["q"]),  # divides by |a*b|
            helper.make_node("Pow", ["b", "minus_half"], ["p"]),  # 1 / sqrt(b)
            helper.make_node("Pow", ["a", "two"], ["s"]),  # a square: no divisor
            helper.make_node("Div", ["s", "three"], ["t"]),  # a constant divisor
            helper.make_node("Sum", ["q", "p", "t"], ["y"]),
        ],
        initializers=(half, two, three),
    )
    assert singular_chains(model) == {"d", "ab", "b"}  # b, a graph input: its pair too


def test_a_chain_goes_through_one_weighted_node_and_never_follows_shapes():
    eye = np.eye(4, dtype=np.float32)
    model = _graph(
        [
            helper.make_node("MatMul", ["a", "w1"], ["m1"]),
            helper.make_node("MatMul", ["m1", "w2"], ["m2"]),
            helper.make_node("Shape", ["a"], ["shape"]),
            helper.make_node("Expand", ["m2", "shape"], ["e"]),
            helper.make_node("Reciprocal", ["e"], ["y"]),
        ],
        inputs=("a",),
        initializers=(
            onnx.numpy_helper.from_array(eye, "w1"),
            onnx.numpy_helper.from_array(eye, "w2"),
        ),
    )
    # through the MatMul that made m2, to m1, which a second MatMul made: a stays int8
    assert singular_chains(model) == {"e", "m2", "m1"}


def test_a_log_mel_front_end_runs_in_float(context, helpers, monkeypatch):
    """Power spectra spanning six decades: rounded anywhere before the Log at the loud
    frames' 8-bit step, a quiet frame reads log(0 + 1e-6)."""
    model = models.log_mel_head()
    assert singular_chains(model) == {"mel_floor", "mel", "power"}

    def worst_error(rules: bool) -> float:
        if not rules:
            monkeypatch.setattr(quantize_static, "singular_chains", lambda model: set())
        ctx = context()
        ctx.calibration = models.power_feeds(16, seed=1)
        quantized = PASS.apply(model, ctx, PASS.resolve_options({})).model
        return float(
            np.median(
                [
                    np.abs(helpers.run(model, f)[0] - helpers.run(quantized, f)[0]).max()
                    for f in models.power_feeds(12, seed=2)
                ]
            )
        )

    assert worst_error(rules=True) < 0.5 < 5 < worst_error(rules=False)


def test_nothing_is_named_in_a_model_with_subgraphs():
    model = models.moments_layer_norm()
    branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    model.graph.node.append(
        helper.make_node("If", ["flag"], ["unused"], then_branch=branch, else_branch=branch)
    )
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    feeds = [{**f, "flag": np.array(True)} for f in models.row_feeds(4, seed=1)]
    assert singular_chains(model) == set()
    assert cancelling_nodes(model, feeds) == []


def test_magnitudes_read_in_groups_under_a_memory_limit_find_the_same_nodes(monkeypatch):
    """A limit smaller than any tensor: one tensor per run, the same answer."""
    from slimfleet.plugins import precision

    model, feeds = models.moments_layer_norm(), models.row_feeds(4, seed=1)
    runs = []
    real = precision.open_session
    monkeypatch.setattr(precision, "open_session", lambda *a: runs.append(1) or real(*a))
    whole = [n.name for n in cancelling_nodes(model, feeds)]
    one_run = len(runs)
    assert [n.name for n in cancelling_nodes(model, feeds, memory=1)] == whole == ["ln_variance"]
    assert one_run == 1 and len(runs) - one_run > 5


def test_differences_whose_terms_stay_float_are_not_measured(monkeypatch):
    """Given what the quantized model rounds, a difference none of whose region is
    rounded (its ops left out of static int8) costs no float run."""
    from slimfleet.plugins import precision

    model, feeds = models.moments_layer_norm(), models.row_feeds(4, seed=1)
    runs = []
    real = precision.open_session
    monkeypatch.setattr(precision, "open_session", lambda *a: runs.append(1) or real(*a))
    assert cancelling_nodes(model, feeds, rounded={"h"}) == [] and runs == []
    found = cancelling_nodes(model, feeds, rounded=set(VARIANCE_TERMS))
    assert [n.name for n in found] == ["ln_variance"] and len(runs) == 1


def test_a_mask_of_infinities_is_not_a_cancellation():
    """scores + mask, the mask holding -inf: the output's finite values are the scores'."""
    model = _graph(
        [
            helper.make_node("Mul", ["a", "b"], ["scores"]),
            helper.make_node("Log", ["b"], ["mask"]),  # log 0 = -inf where b is 0
            helper.make_node("Add", ["scores", "mask"], ["y"]),
        ]
    )
    feeds = [{"a": np.full(4, 3.0, np.float32), "b": np.array([1, 0, 1, 0], np.float32)}]
    assert cancelling_nodes(model, feeds) == []


def test_a_silu_written_as_a_division_keeps_only_its_denominator_float():
    """x / (1 + exp(-x)) after a Conv: the walk stops at Exp, whose input's rounding is a
    bounded relative error; the Conv and what feeds it stay int8."""
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["img", "w"], ["c"]),
            helper.make_node("Neg", ["c"], ["minus"]),
            helper.make_node("Exp", ["minus"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["denominator"]),
            helper.make_node("Div", ["c", "denominator"], ["y"]),
        ],
        "silu",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [
            onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
            onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert singular_chains(model) == {"denominator", "e"}


@pytest.mark.parametrize("log_first", [False, True])
def test_the_chains_are_the_same_in_any_node_order(log_first):
    """m1 is reached from the Log with no weighted node crossed, and from the Reciprocal
    after one: whichever walk comes first, a (m1's input) is named."""
    eye = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    ends = [helper.make_node("Reciprocal", ["m2"], ["r"]), helper.make_node("Log", ["m1"], ["l"])]
    model = _graph(
        [
            helper.make_node("MatMul", ["a", "w"], ["m1"]),
            helper.make_node("MatMul", ["m1", "w"], ["m2"]),
            *(ends[::-1] if log_first else ends),
            helper.make_node("Add", ["r", "l"], ["y"]),
        ],
        inputs=("a",),
        initializers=(eye,),
    )
    assert singular_chains(model) == {"a", "m1", "m2"}


def test_a_constant_node_exponent_and_a_square_by_mul_are_read():
    exponent = helper.make_node(
        "Constant",
        [],
        ["minus_half"],
        value=onnx.numpy_helper.from_array(np.array(-0.5, np.float32)),
    )
    model = _graph(
        [
            exponent,
            helper.make_node("Mul", ["a", "a"], ["square"]),  # one operand, twice
            helper.make_node("Pow", ["square", "minus_half"], ["p"]),
            helper.make_node("Add", ["p", "b"], ["y"]),
        ]
    )
    assert singular_chains(model) == {"square", "a"}


def test_a_difference_of_two_inputs_keeps_the_inputs_float():
    model = _graph([helper.make_node("Sub", ["a", "b"], ["y"])])
    feeds = [{"a": np.full(4, 100.0, np.float32), "b": np.full(4, 99.5, np.float32)}]
    (node,) = cancelling_nodes(model, feeds)
    assert cancellation_regions(model, [node]) == [{"a", "b"}]


def test_the_region_stops_at_a_shared_ancestor_a_light_op_made():
    """2r - 1.9r, r = Relu(a): r and a stay int8, only the two terms go float."""
    two = onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")
    most = onnx.numpy_helper.from_array(np.array(1.9, np.float32), "most")
    model = _graph(
        [
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Mul", ["r", "two"], ["p"]),
            helper.make_node("Mul", ["r", "most"], ["q"]),
            helper.make_node("Sub", ["p", "q"], ["y"]),
        ],
        inputs=("a",),
        initializers=(two, most),
    )
    (node,) = cancelling_nodes(model, [{"a": np.arange(4, dtype=np.float32)}])
    assert cancellation_regions(model, [node]) == [{"p", "q"}]


def test_the_rules_can_be_turned_off_and_a_failed_measurement_is_a_note(context, monkeypatch):
    model, ctx = models.moments_layer_norm(), context()
    ctx.calibration = models.row_feeds(8, seed=1)
    off = PASS.apply(model, ctx, PASS.resolve_options({"precision": False}))
    assert "kept" not in off.notes

    def broken(*args):
        raise RuntimeError("onnxruntime could not load it")

    monkeypatch.setattr(quantize_static, "cancelling_nodes", broken)
    result = PASS.apply(model, ctx, PASS.resolve_options({}))
    assert "cancelling differences not measured: onnxruntime could not load it" in result.notes
    assert "a reciprocal, division or log reads them" in result.notes  # the other rule ran
