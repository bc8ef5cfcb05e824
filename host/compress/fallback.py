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
    """Names of float-model nodes the quantizer replaced or fed with dequantized values.

    A node counts when the tensor it produced is now made by another op type
    (``MatMul`` -> ``MatMulInteger`` ... ``Mul``) or by a node reading a
    ``DequantizeLinear`` output (QDQ format). Unnamed nodes cannot be excluded by name
    and are left out.
    """
    made_by = _producers(quantized.graph)
    names = []
    for node in float_model.graph.node:
        now = made_by.get(node.output[0]) if node.output else None
        if not node.name or now is None:
            continue
        if now.op_type != node.op_type or any(
            (src := made_by.get(i)) is not None and src.op_type == "DequantizeLinear"
            for i in now.input
        ):
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
    weights = {t.name for t in float_model.graph.initializer}
    in_quantized = set(_producers(quantized.graph)) | {i.name for i in quantized.graph.input}
    nodes = [n for n in float_model.graph.node if n.name in names]
    tensors = {
        t
        for n in nodes
        for t in [n.output[0], *n.input]
        if t and t not in weights and t in in_quantized
    }
    ordered = sorted(tensors)
    float_out = run(with_outputs(float_model, ordered))
    quant_out = run(with_outputs(quantized, ordered))
    if float_out is None or quant_out is None:
        return []
    error = {
        t: _relative_error([s[t] for s in float_out], [s[t] for s in quant_out]) for t in ordered
    }
    harm = []
    for node in nodes:
        if node.output[0] not in error:
            continue
        inherited = max((error.get(i, 0.0) for i in node.input if i in error), default=0.0)
        harm.append((node.name, error[node.output[0]] - inherited))
    return sorted(harm, key=lambda item: -item[1])


def exclusion_sizes(count: int) -> list[int]:
    """How many top-ranked nodes each variant keeps in float: 1, 2, 4, ... below ``count``."""
    sizes, k = [], 1
    while k < count and len(sizes) < MAX_VARIANTS:
        sizes.append(k)
        k *= 2
    return sizes
