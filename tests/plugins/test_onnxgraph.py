"""onnxgraph: the graph queries the passes share."""

from __future__ import annotations

from collections import Counter

import models
import numpy as np
from onnx import helper

from slimfleet.plugins.normalize import Normalize
from slimfleet.plugins.onnxgraph import (
    describe_change,
    describe_counts,
    error_line,
    fix_ir_version,
    float_attr,
    has_subgraphs,
    multiply_accumulates,
    or_list,
)


def test_multiply_accumulates_per_weighted_node():
    feed = {"input": np.zeros((1, 3, 32, 32), np.float32)}
    assert multiply_accumulates(models.conv_bn_net(), feed) == {
        "conv1": 16 * 32 * 32 * 3 * 3 * 3,
        "conv2": 16 * 32 * 32 * 16 * 3 * 3,
        "fc": 10 * 16,
    }
    batch_of_2 = {"x": np.zeros((2, 64), np.float32)}
    assert multiply_accumulates(models.mlp(), batch_of_2) == {
        "mm1": 2 * 128 * 64,
        "mm2": 2 * 10 * 128,
    }
    assert multiply_accumulates(models.mlp(), {}) == {}  # the batch size stays unknown


def test_descriptions():
    assert describe_counts(Counter({"LSTM": 1, "MatMul": 2, "Add": 0})) == "2 MatMul, 1 LSTM"
    assert or_list(["Conv"]) == "Conv"
    assert or_list(["MatMul", "Gemm", "LSTM"]) == "MatMul, Gemm or LSTM"
    assert error_line(RuntimeError("first\nsecond")) == "first"
    assert error_line(ValueError()) == "ValueError"


def test_describe_change(context):
    before = models.constant_weights()
    after = Normalize().apply(before, context(), Normalize().resolve_options({})).model
    assert describe_change(before, after) == "nodes 9 -> 5; removed 4 Constant"
    assert describe_change(after, after) == ""


def test_model_facts():
    assert not has_subgraphs(models.lstm())
    model = models.mlp()
    model.opset_import[0].version = 17
    model.ir_version = 3
    fix_ir_version(model)
    assert model.ir_version == 8
    body = helper.make_graph([], "body", [], [])
    branchy = helper.make_model(
        helper.make_graph(
            [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)],
            "if",
            [],
            [],
        )
    )
    assert has_subgraphs(branchy)


def test_float_attr_reads_or_defaults():
    node = helper.make_node("Gemm", ["a", "b"], ["c"], alpha=0.5)
    assert float_attr(node, "alpha", 1.0) == 0.5
    assert float_attr(node, "beta", 1.0) == 1.0
