"""Graph queries and small edits shared by the built-in passes (not a plugin itself)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so a pass never modifies the model it was given."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    """Float attribute ``name`` of ``node``, or ``default`` when absent."""
    return next((a.f for a in node.attribute if a.name == name), default)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op type the main graph holds."""
    return Counter(node.op_type for node in model.graph.node)


def describe_counts(counts: Counter[str] | dict[str, int]) -> str:
    """``{"MatMul": 2, "LSTM": 1}`` -> ``"2 MatMul, 1 LSTM"`` (largest first)."""
    items = sorted(((n, op) for op, n in counts.items() if n), key=lambda x: (-x[0], x[1]))
    return ", ".join(f"{n} {op}" for n, op in items)


def describe_change(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    """``"nodes 9 -> 7; removed 2 BatchNormalization"``, or "" when the op histogram and
    the number of initializers are the same."""
    old, new = op_counts(before), op_counts(after)
    if old == new and len(before.graph.initializer) == len(after.graph.initializer):
        return ""
    parts = [f"nodes {sum(old.values())} -> {sum(new.values())}"]
    if old - new:
        parts.append(f"removed {describe_counts(old - new)}")
    if new - old:
        parts.append(f"added {describe_counts(new - old)}")
    return "; ".join(parts)


def or_list(names: Iterable[str]) -> str:
    """``["MatMul", "Gemm", "LSTM"]`` -> ``"MatMul, Gemm or LSTM"``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Value name -> the node that outputs it (graph inputs and initializers have none)."""
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Value name -> the (node, input index) pairs that read it."""
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                found.setdefault(name, []).append((node, index))
    return found


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """True when a node carries a graph attribute (If, Loop, Scan bodies)."""
    return any(
        attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for attr in node.attribute
    )


def fix_ir_version(model: onnx.ModelProto) -> None:
    """Raise ``ir_version`` to the lowest one that the model's opset imports allow."""
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed)


def multiply_accumulates(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """Multiply-accumulates of each Conv, ConvTranspose, Gemm and MatMul node whose weight
    (input 1) is an initializer, for inputs shaped like ``feed``; {} when shapes stay
    unknown. A measure of where a model spends its arithmetic."""
    fixed = copy_model(model)
    for value in fixed.graph.input:
        if value.name in feed:
            declared = value.type.tensor_type.shape.dim
            for dim, size in zip(declared, feed[value.name].shape, strict=False):
                dim.dim_value = size
    try:
        graph = onnx.shape_inference.infer_shapes(fixed, data_prop=True).graph
    except Exception:  # onnx raises InferenceError and, for odd models, others
        return {}
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.value_info, *graph.output]
    }
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    counts = {}
    for node in model.graph.node:
        if node.op_type not in _PER_OUTPUT or len(node.input) < 2 or node.input[1] not in weights:
            continue
        shape = shapes.get(node.input[0] if node.op_type == "ConvTranspose" else node.output[0])
        if shape and all(shape):
            counts[node.name] = math.prod(shape) * _PER_OUTPUT[node.op_type](
                node, weights[node.input[1]]
            )
    return counts


_PER_OUTPUT = {
    "Conv": lambda node, w: math.prod(w[1:]),
    "ConvTranspose": lambda node, w: math.prod(w[1:]),  # per input element
    "MatMul": lambda node, w: w[0],
    "Gemm": lambda node, w: (
        w[1] if any(a.name == "transB" and a.i for a in node.attribute) else w[0]
    ),
}
"""Multiply-accumulates per output element, from the node and its weight's shape."""


def error_line(exc: BaseException) -> str:
    """The first line of an exception raised by onnx, onnxsim or onnxruntime (their
    messages run to many lines), or its type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
