"""Small ONNX models with the input and graph kinds real exporters produce.

Paddle's ``-1`` dims, a scalar sample rate, integer/bool/uint8 inputs, a streaming GRU
with its state as 1-d inputs and outputs, an If and a Loop, an ``ai.onnx.ml`` classifier
with a ``seq(map)`` output, and a declared output shape that is wrong. Built with
onnx.helper, weights from a fixed seed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0


def _f32(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    onnx.checker.check_model(model)
    return model


def paddle_classifier(dynamic: int = -1, opset: int = 13) -> onnx.ModelProto:
    """Conv, pool, Gemm over ``x`` declared ``[d, 3, d, d]`` with ``d`` = ``dynamic``
    written as a dim_value (Paddle writes -1). Output ``[d, 10]``."""
    rng = np.random.default_rng(SEED)
    inits = [
        _f32("w", rng.normal(0, 0.3, (8, 3, 3, 3))),
        _f32("b", rng.normal(0, 0.1, (8,))),
        _f32("fw", rng.normal(0, 0.3, (10, 8))),
        _f32("fb", rng.normal(0, 0.1, (10,))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 1, 1])
    for dim in x.type.tensor_type.shape.dim[:1] + x.type.tensor_type.shape.dim[2:]:
        dim.dim_value = dynamic
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])
    y.type.tensor_type.shape.dim[0].dim_value = dynamic
    graph = helper.make_graph(nodes, "paddle_classifier", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model  # the checker refuses -1 dims; onnxruntime runs them


def audio_with_rate(opset: int = 13) -> onnx.ModelProto:
    """``audio`` float [batch, 160] and ``sr`` a 0-d int64 (the sample rate), as in
    VAD models: the features are scaled by sr / 16000. Output ``[batch, 8]``."""
    rng = np.random.default_rng(SEED)
    inits = [_f32("w", rng.normal(0, 0.2, (160, 8))), _f32("ref_rate", 16000.0)]
    nodes = [
        helper.make_node("MatMul", ["audio", "w"], ["h"], name="mm"),
        helper.make_node("Cast", ["sr"], ["srf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "ref_rate"], ["scale"], name="div"),
        helper.make_node("Mul", ["h", "scale"], ["features"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "audio_with_rate",
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 160]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    return _model(graph, opset)


TYPED = {"i32": TensorProto.INT32, "i64": TensorProto.INT64, "flag": TensorProto.BOOL}
TYPED_UINT8 = "pixels"


def typed_inputs(opset: int = 13) -> onnx.ModelProto:
    """Four inputs of shape [1, 8]: int32, int64, bool and uint8, cast to float, summed
    and projected; outputs ``scores`` [1, 4] and ``label`` (int64 argmax) [1]."""
    rng = np.random.default_rng(SEED)
    names = [*TYPED, TYPED_UINT8]
    nodes = [
        helper.make_node("Cast", [n], [f"{n}_f"], name=f"cast_{n}", to=TensorProto.FLOAT)
        for n in names
    ]
    nodes += [
        helper.make_node("Sum", [f"{n}_f" for n in names], ["total"], name="sum"),
        helper.make_node("MatMul", ["total", "w"], ["scores"], name="mm"),
        helper.make_node("ArgMax", ["scores"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    inputs = [helper.make_tensor_value_info(n, t, [1, 8]) for n, t in TYPED.items()]
    inputs.append(helper.make_tensor_value_info(TYPED_UINT8, TensorProto.UINT8, [1, 8]))
    graph = helper.make_graph(
        nodes,
        "typed_inputs",
        inputs,
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
        ],
        [_f32("w", rng.normal(0, 0.2, (8, 4)))],
    )
    return _model(graph, opset)


def streaming_gru(hidden: int = 16, features: int = 12, opset: int = 13) -> onnx.ModelProto:
    """One step of a streaming GRU: ``frame`` [1, features] and the state ``h_in``
    [hidden] (1-d, as madmom exports it) in; ``scores`` [1, 5] and ``h_out`` [hidden] out."""
    rng = np.random.default_rng(SEED)
    inits = [
        _f32("W", rng.normal(0, 0.3, (1, 3 * hidden, features))),
        _f32("R", rng.normal(0, 0.3, (1, 3 * hidden, hidden))),
        _f32("B", rng.normal(0, 0.1, (1, 6 * hidden))),
        _f32("head", rng.normal(0, 0.3, (hidden, 5))),
        _i64("seq_shape", [1, 1, features]),
        _i64("state_shape", [1, 1, hidden]),
        _i64("flat", [hidden]),
        _i64("row", [1, hidden]),
    ]
    nodes = [
        helper.make_node("Reshape", ["frame", "seq_shape"], ["x"], name="to_seq"),
        helper.make_node("Reshape", ["h_in", "state_shape"], ["h0"], name="to_state"),
        helper.make_node(
            "GRU", ["x", "W", "R", "B", "", "h0"], ["", "h"], name="gru", hidden_size=hidden
        ),
        helper.make_node("Reshape", ["h", "flat"], ["h_out"], name="from_state"),
        helper.make_node("Reshape", ["h", "row"], ["h_row"], name="to_row"),
        helper.make_node("MatMul", ["h_row", "head"], ["scores"], name="head_mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "streaming_gru",
        [
            helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, features]),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [hidden]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [hidden]),
        ],
        inits,
    )
    return _model(graph, opset)


def control_flow(opset: int = 13) -> onnx.ModelProto:
    """``x`` [1, 16] -> MatMul, then an If on the sign of its sum (each branch a MatMul
    with its own weight) and a Loop adding a MatMul three times. Output ``y`` [1, 16]."""
    rng = np.random.default_rng(SEED)

    def branch(name: str) -> onnx.GraphProto:
        weight = _f32(f"{name}_w", rng.normal(0, 0.3, (16, 16)))
        return helper.make_graph(
            [helper.make_node("MatMul", ["h", weight.name], [f"{name}_out"], name=f"{name}_mm")],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 16])],
            [weight],
        )

    body_w = _f32("body_w", rng.normal(0, 0.2, (16, 16)))
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["acc_in", "body_w"], ["step"], name="body_mm"),
            helper.make_node("Add", ["acc_in", "step"], ["acc_out"], name="body_add"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 16]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 16]),
        ],
        [body_w],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
        helper.make_node("ReduceSum", ["h"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="sign"),
        helper.make_node(
            "If",
            ["positive"],
            ["branched"],
            name="if",
            then_branch=branch("then"),
            else_branch=branch("else"),
        ),
        helper.make_node("Loop", ["trips", "yes", "branched"], ["y"], name="loop", body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [
            _f32("w0", rng.normal(0, 0.3, (16, 16))),
            _f32("zero", 0.0),
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "yes"),
        ],
    )
    return _model(graph, opset)


def ml_classifier() -> onnx.ModelProto:
    """scikit-learn style: ``ai.onnx.ml`` LinearClassifier + ZipMap and no ``ai.onnx``
    import. Outputs ``label`` int64 [N] and ``probabilities`` seq(map(int64, float)).
    Input ``x`` float [N, 4]."""
    rng = np.random.default_rng(SEED)
    nodes = [
        helper.make_node(
            "LinearClassifier",
            ["x"],
            ["label", "scores"],
            name="linear",
            domain="ai.onnx.ml",
            classlabels_ints=[0, 1, 2],
            coefficients=rng.normal(0, 1, 12).astype(np.float32).tolist(),
            intercepts=[0.1, -0.2, 0.0],
            post_transform="SOFTMAX",
        ),
        helper.make_node(
            "ZipMap",
            ["scores"],
            ["probabilities"],
            name="zipmap",
            domain="ai.onnx.ml",
            classlabels_int64s=[0, 1, 2],
        ),
    ]
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, []))
    )
    graph = helper.make_graph(
        nodes,
        "ml_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_value_info("probabilities", seq_map),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8  # like logreg_iris: no ai.onnx import at all
    onnx.checker.check_model(model)
    return model


def wrong_output_shape(model: onnx.ModelProto, dims: list[int]) -> onnx.ModelProto:
    """``model`` with its first output's declared shape replaced by ``dims`` (a lie)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shape = out.graph.output[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d
    return out


def with_string_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a second output: its first output cast to strings (as a label
    lookup does), which onnxruntime returns as an array of Python str objects."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    first = out.graph.output[0].name
    out.graph.node.append(helper.make_node("Cast", [first], ["text"], to=TensorProto.STRING))
    text = onnx.ValueInfoProto()
    text.CopyFrom(out.graph.output[0])
    text.name = "text"
    text.type.tensor_type.elem_type = TensorProto.STRING
    out.graph.output.append(text)
    onnx.checker.check_model(out)
    return out


def optional_input(opset: int = 18) -> onnx.ModelProto:
    """``o``: optional(tensor(float, [1, 4])), unwrapped by OptionalGetElement."""
    tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(
        [
            helper.make_node("OptionalGetElement", ["o"], ["x"]),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        "optional_input",
        [helper.make_value_info("o", helper.make_optional_type_proto(tensor))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return _model(graph, opset)


def declared_input(shape: list[int], elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """Relu over ``x`` declared ``shape`` of ``elem_type`` (a Cast to float first when it
    is not float)."""
    nodes = [helper.make_node("Relu", ["f"], ["y"])]
    if elem_type == TensorProto.FLOAT:
        nodes[0].input[0] = "x"
    else:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "declared_input",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    return _model(graph, 13)
