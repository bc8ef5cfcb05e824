"""Per-layer fallback: which quantized nodes hurt fidelity most, to keep them in float.

The float model (as it entered the quantizer) and the quantized candidate are both run
with every relevant intermediate tensor exposed as an output. A quantized node's harm is
the relative error of its output minus the worst relative error of its inputs, so error
a node merely inherits from upstream is not blamed on it. Only two extra runs are needed,
however many nodes the model has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from slimfleet.host.compress.evaluate import Outputs

MAX_VARIANTS = 5
"""Fallback variants per candidate: 1, 2, 4, 8, 16 nodes kept in float."""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def quantized_nodes(float_model: onnx.ModelProto, quantized: onnx.ModelProto) -> list[str]:
    """Names of float-model nodes whose weights or op a quantizer (or fp16) changed.

    A node counts when the tensor it produced is now made by another op type
    (``MatMul`` -> ``MatMulInteger`` ... ``Mul``), or by a node that reads a weight
    through ``DequantizeLinear`` (QDQ format) or a weight whose type changed (fp16).
    Activation-only ops between them (Relu, Sigmoid, Mul) are not listed: quantizers
    keep their inputs quantized for the neighbours' sake, so leaving one of them out
    changes nothing. Unnamed nodes cannot be excluded by name and are left out.
    """
    made_by = _producers(quantized.graph)
    weight_types = {t.name: t.data_type for t in float_model.graph.initializer}
    now_types = {t.name: t.data_type for t in quantized.graph.initializer}

    def changed_weight(tensor: str) -> bool:
        if tensor in now_types:
            return tensor in weight_types and now_types[tensor] != weight_types[tensor]
        src = made_by.get(tensor)
        return src is not None and src.op_type == "DequantizeLinear" and src.input[0] in now_types

    names = []
    for node in float_model.graph.node:
        now = made_by.get(node.output[0]) if node.output else None
        if not node.name or now is None:
            continue
        if now.op_type != node.op_type or any(changed_weight(i) for i in now.input):
            names.append(node.name)
    return names


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``tensors`` (types left to onnxruntime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return probe


def _relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    errors = []
    for ref, got in zip(reference, candidate, strict=True):
        if ref.shape != got.shape or ref.dtype.kind != "f":
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        errors.append(np.linalg.norm(ref64 - got64) / (np.linalg.norm(ref64) + 1e-12))
    return float(np.mean(errors)) if errors else 0.0


def rank_nodes(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    run: Callable[[onnx.ModelProto], list[Outputs] | None],
) -> list[tuple[str, float]]:
    """Quantized nodes with their harm, most harmful first.

    ``run`` executes a model on a few evaluation samples and returns its outputs per
    sample (None when it fails; then nothing can be ranked and ``[]`` comes back).
    """
    names = set(quantized_nodes(float_model, quantized))
    if not names:
        return []
    graph = float_model.graph
    weights = {t.name for t in graph.initializer}
    in_quantized = set(_producers(quantized.graph)) | {i.name for i in quantized.graph.input}
    tensors = sorted({o for n in graph.node for o in n.output if o and o in in_quantized} - weights)
    float_out = run(with_outputs(float_model, tensors))
    quant_out = run(with_outputs(quantized, tensors))
    if float_out is None or quant_out is None:
        return []
    error = {
        t: _relative_error([s[t] for s in float_out], [s[t] for s in quant_out]) for t in tensors
    }
    inherited = _inherited_error(graph, error)
    harm = [
        (node.name, error[node.output[0]] - max((inherited(i) for i in node.input), default=0.0))
        for node in graph.node
        if node.name in names and node.output[0] in error
    ]
    return sorted(harm, key=lambda item: -item[1])


def _inherited_error(graph: onnx.GraphProto, error: dict[str, float]) -> Callable[[str], float]:
    """The error a tensor carries in: its own when measured, else its nearest measured
    ancestors' worst (a tensor the quantizer fused away is looked through)."""
    producers = _producers(graph)
    memo: dict[str, float] = {}

    def inherited(tensor: str) -> float:
        if tensor in error:
            return error[tensor]
        if tensor not in memo:
            memo[tensor] = 0.0  # cycles cannot happen in a valid graph; this guards anyway
            node = producers.get(tensor)
            memo[tensor] = (
                max((inherited(i) for i in node.input if i), default=0.0) if node else 0.0
            )
        return memo[tensor]

    return inherited


def exclusion_sizes(count: int) -> list[int]:
    """How many top-ranked nodes each variant keeps in float: 1, 2, 4, ... below ``count``."""
    sizes, k = [], 1
    while k < count and len(sizes) < MAX_VARIANTS:
        sizes.append(k)
        k *= 2
    return sizes
