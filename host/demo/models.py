"""The demo's generated models: a two-slot pipeline ``features`` -> ``classify``.

``features`` turns a 64-value sensor reading into 256 features (dense + ReLU);
``classify`` turns those into 12 class probabilities (two dense layers + softmax), about
0.6 MB of float32 weights, enough for int8 to matter. ``features_model(seed,
SLOW_STEPS)`` is a build of ``features`` that also runs a long chain of large matrix
products (a deliberately bad version: the same answers, ~1000x slower, ~25 ms).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

READING, FEATURES, HIDDEN, CLASSES = 64, 256, 512, 12
SLOW_STEPS, SLOW_WIDTH = 24, 768  # the bad build's extra work: 24 products of 768x768


def _dense(
    rng: np.random.Generator, current: str, n_in: int, n_out: int, tag: str, relu: bool
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    w = rng.normal(0, (2 / n_in) ** 0.5, (n_in, n_out)).astype(np.float32)
    b = rng.normal(0, 0.05, n_out).astype(np.float32)
    inits = [numpy_helper.from_array(w, f"w_{tag}"), numpy_helper.from_array(b, f"b_{tag}")]
    nodes = [
        helper.make_node("MatMul", [current, f"w_{tag}"], [f"m_{tag}"], name=f"dense_{tag}"),
        helper.make_node("Add", [f"m_{tag}", f"b_{tag}"], [f"a_{tag}"], name=f"bias_{tag}"),
    ]
    out = f"a_{tag}"
    if relu:
        nodes.append(helper.make_node("Relu", [out], [f"r_{tag}"], name=f"relu_{tag}"))
        out = f"r_{tag}"
    return nodes, inits, out


def _model(
    name: str,
    inputs: tuple[str, int],
    outputs: tuple[str, int],
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, [1, inputs[1]])],
        [helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, [1, outputs[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _needless_work(reading: str, features: str, steps: int) -> tuple[list, list, str]:
    """Nodes that run ``steps`` products of SLOW_WIDTH x SLOW_WIDTH matrices on a tiled
    ``reading`` and add 0 x their sum to ``features`` (so no optimizer drops them)."""
    rng = np.random.default_rng(1000)
    inits = [
        numpy_helper.from_array(np.array([64, 1], np.int64), "slow_tiles"),
        numpy_helper.from_array(
            rng.normal(0, 0.01, (READING, SLOW_WIDTH)).astype(np.float32), "slow_in"
        ),
        numpy_helper.from_array(
            rng.normal(0, 0.01, (SLOW_WIDTH, SLOW_WIDTH)).astype(np.float32), "slow_w"
        ),
        numpy_helper.from_array(np.zeros((1, FEATURES), np.float32), "slow_zero"),
    ]
    nodes = [
        helper.make_node("Tile", [reading, "slow_tiles"], ["slow_x"], name="slow_tile"),
        helper.make_node("MatMul", ["slow_x", "slow_in"], ["slow_0"], name="slow_0"),
    ]
    nodes += [
        helper.make_node("MatMul", [f"slow_{i}", "slow_w"], [f"slow_{i + 1}"], name=f"slow_{i + 1}")
        for i in range(steps)
    ]
    nodes += [
        helper.make_node("ReduceSum", [f"slow_{steps}"], ["slow_sum"], keepdims=0, name="sum"),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nil"], name="nil"),
        helper.make_node("Add", [features, "slow_nil"], ["slow_f"], name="slow_f"),
    ]
    return nodes, inits, "slow_f"


def features_model(seed: int, slow_steps: int = 0) -> onnx.ModelProto:
    """``x`` [1, 64] -> ``f`` [1, 256]; each seed is another version's weights.

    ``slow_steps`` > 0 gives the same answers after that many needless matrix products
    (the demo's deliberately bad build)."""
    nodes, inits, out = _dense(np.random.default_rng(seed), "x", READING, FEATURES, "f", True)
    if slow_steps:
        more_nodes, more_inits, out = _needless_work("x", out, slow_steps)
        nodes, inits = nodes + more_nodes, inits + more_inits
    nodes.append(helper.make_node("Identity", [out], ["f"], name="out"))
    return _model("features", ("x", READING), ("f", FEATURES), nodes, inits)


def classify_model(seed: int = 11) -> onnx.ModelProto:
    """``f`` [1, 256] -> ``probs`` [1, 12]: dense 512 + ReLU, dense 12, softmax."""
    rng = np.random.default_rng(seed)
    hidden, inits, out = _dense(rng, "f", FEATURES, HIDDEN, "h", True)
    logits, more, out = _dense(rng, out, HIDDEN, CLASSES, "c", False)
    nodes = [*hidden, *logits, helper.make_node("Softmax", [out], ["probs"], axis=-1, name="sm")]
    return _model("classify", ("f", FEATURES), ("probs", CLASSES), nodes, inits + more)


def readings(count: int, seed: int) -> np.ndarray:
    """``count`` sensor readings, each shaped [1, 64] (the ``features`` input)."""
    return np.random.default_rng(seed).normal(size=(count, 1, READING)).astype(np.float32)


def features_of(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """What a ``features`` model answers for each reading (numpy, no session)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return np.maximum(x @ weights["w_f"] + weights["b_f"], 0).astype(np.float32)
