"""Pass ``prune``: magnitude pruning of MatMul/Gemm/Conv weights, without retraining.

``unstructured`` zeroes the smallest weights of each tensor (the file compresses
better, the dense kernels run as before). ``channels`` removes whole output channels
of a Conv with the smallest L1 norm, and the matching parameters downstream (bias,
BatchNorm statistics, per-channel Mul/Add, the next Conv's input channels, a
classifier after global pooling), so the model gets smaller and faster. A Conv whose
output reaches anything else is left alone, and the notes say why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins.normalize import infer_shapes
from slimfleet.plugins.onnxgraph import consumers, copy_model

WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}
CHANNEL_WISE = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu"}
    | {"Softplus", "MaxPool", "AveragePool", "Identity", "Dropout"}
)
"""Ops that keep the channel axis as it is (per-element or per-channel spatial)."""
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})


class Prune(Pass):
    name = "prune"
    description = (
        "Magnitude pruning without retraining: zero the smallest weights (unstructured) "
        "or remove the weakest Conv output channels (channels, smaller and faster)"
    )
    options = (
        Option(
            "mode",
            str,
            "unstructured",
            "unstructured: zero weights in place; channels: remove Conv output channels",
            choices=("unstructured", "channels"),
        ),
        Option("sparsity", float, 0.5, "fraction of weights (or channels) to remove, 0..1"),
    )

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        if not 0.0 < options["sparsity"] < 1.0:
            return f"sparsity {options['sparsity']} is not between 0 and 1"
        inits = {t.name for t in model.graph.initializer}
        ops = ("Conv",) if options["mode"] == "channels" else tuple(WEIGHT_INPUT)
        if not any(
            n.op_type in ops and len(n.input) > 1 and n.input[1] in inits for n in model.graph.node
        ):
            kinds = "Conv" if options["mode"] == "channels" else "MatMul, Gemm or Conv"
            return f"no {kinds} node with its weights in an initializer"
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        out = copy_model(model)
        if options["mode"] == "unstructured":
            return _unstructured(out, options["sparsity"])
        return _channels(model, out, options["sparsity"])


def _unstructured(model: onnx.ModelProto, sparsity: float) -> PassResult:
    inits = {t.name: t for t in model.graph.initializer}
    names = {
        n.input[WEIGHT_INPUT[n.op_type]]
        for n in model.graph.node
        if n.op_type in WEIGHT_INPUT and len(n.input) > 1 and n.input[1] in inits
    }
    if not names:
        return PassResult(model, False, "changed nothing: no weights in initializers")
    zeroed = total = 0
    for name in sorted(names):
        weights = numpy_helper.to_array(inits[name])
        k = math.ceil(weights.size * sparsity - 1e-9)  # at least the asked fraction
        if k == 0:
            continue
        threshold = np.partition(np.abs(weights).ravel(), k - 1)[k - 1]
        pruned = np.where(np.abs(weights) <= threshold, 0, weights).astype(weights.dtype)
        inits[name].CopyFrom(numpy_helper.from_array(pruned, name))
        zeroed += int((pruned == 0).sum())
        total += weights.size
    if not zeroed:
        return PassResult(model, False, "changed nothing: weight tensors too small to prune")
    return PassResult(
        model,
        True,
        f"zeroed {zeroed / total:.1%} of {total} weights in {len(names)} tensors "
        "(same file size and speed; compresses better)",
    )


@dataclass
class ChannelCut:
    """Removing output channels ``drop`` of one Conv: the initializer slices it takes."""

    conv: str
    channels: int
    drop: np.ndarray
    slices: list[tuple[str, int]] = field(default_factory=list)
    """(initializer name, axis) pairs to cut at ``drop``."""


def _channels(original: onnx.ModelProto, model: onnx.ModelProto, sparsity: float) -> PassResult:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = {name: len(r) for name, r in consumers(graph).items()}
    cuts, skipped = [], []
    for position, node in enumerate(graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        cut, why = _plan_cut(graph, position, inits, sparsity)
        shared = [name for name, _ in (cut.slices if cut else []) if uses.get(name, 0) > 1]
        if shared:
            why = f"parameter {shared[0]} is shared with other nodes"
        if cut is None or shared:
            skipped.append(f"{node.name or node.output[0]} ({why})")
        else:
            cuts.append(cut)
    for cut in cuts:
        for name, axis in cut.slices:
            array = np.delete(numpy_helper.to_array(inits[name]), cut.drop, axis=axis)
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
    notes = []
    if cuts:
        removed, total = sum(len(c.drop) for c in cuts), sum(c.channels for c in cuts)
        detail = ", ".join(f"{c.conv} {c.channels}->{c.channels - len(c.drop)}" for c in cuts)
        notes.append(
            f"removed {removed} of {total} output channels in {len(cuts)} Conv: {shorten(detail)}"
        )
    if skipped:
        notes.append(f"left {len(skipped)} Conv as they were: {shorten(', '.join(skipped))}")
    if not cuts:
        why = "; ".join(notes) or "no Conv with its weights in an initializer"
        return PassResult(copy_model(original), False, f"changed nothing: {why}")
    del graph.value_info[:]  # shapes changed; infer them again
    model, failure = infer_shapes(model)
    return PassResult(model, True, "; ".join(notes + ([failure] if failure else [])))


def _plan_cut(
    graph: onnx.GraphProto, position: int, inits: dict[str, onnx.TensorProto], sparsity: float
) -> tuple[ChannelCut | None, str]:
    """Which channels of the Conv at ``position`` to drop and what to slice with them,
    or why it cannot be done. Follows the Conv's output in topological order through
    channel-wise ops to the layers that read the channels (next Conv, or a Gemm/MatMul
    after global pooling and Flatten)."""
    conv = graph.node[position]
    if int_attr(conv, "group", 1) != 1:
        return None, "grouped Conv"
    weights = numpy_helper.to_array(inits[conv.input[1]])
    count = weights.shape[0]
    k = min(int(count * sparsity), count - 1)
    if k == 0:
        return None, f"only {count} channels"
    norms = np.abs(weights).reshape(count, -1).sum(axis=1)
    cut = ChannelCut(conv.name or conv.output[0], count, np.sort(np.argsort(norms)[:k]))
    cut.slices = [(conv.input[1], 0)] + ([(conv.input[2], 0)] if len(conv.input) > 2 else [])
    outputs = {o.name for o in graph.output}
    if conv.output[0] in outputs:
        return None, f"{conv.output[0]} is a graph output"
    region = {conv.output[0]: "spatial"}  # value -> layout: spatial, pooled or flat
    for node in list(graph.node)[position + 1 :]:
        inside = [i for i, name in enumerate(node.input) if name in region]
        if not inside:
            continue
        layout = region[node.input[inside[0]]]
        after, why = channel_step(node, inside, layout, region, cut, inits)
        if why:
            return None, why
        if after is not None:
            if node.output[0] in outputs:
                return None, f"{node.output[0]} is a graph output"
            region[node.output[0]] = after
    return cut, ""


def channel_step(
    node: onnx.NodeProto,
    inside: list[int],
    layout: str,
    region: dict[str, str],
    cut: ChannelCut,
    inits: dict[str, onnx.TensorProto],
) -> tuple[str | None, str]:
    """How ``node`` treats the pruned channels: (layout of its output, "") when they flow
    on, (None, "") when it consumes them, (None, why) when pruning must not go on."""
    op, name = node.op_type, node.name or node.output[0]
    first_only = inside == [0]
    if op == "Conv" and first_only and layout != "flat" and int_attr(node, "group", 1) == 1:
        if node.input[1] not in inits:
            return None, f"Conv {name} has no initializer weights"
        cut.slices.append((node.input[1], 1))
        return None, ""
    if op in ("Gemm", "MatMul") and first_only and layout == "flat" and node.input[1] in inits:
        transposed = op == "Gemm" and int_attr(node, "transB", 0)
        cut.slices.append((node.input[1], 1 if transposed else 0))
        return None, ""
    if op == "BatchNormalization" and first_only:
        if any(p not in inits for p in node.input[1:5]):
            return None, f"BatchNormalization {name} has non-constant statistics"
        cut.slices += [(p, 0) for p in node.input[1:5]]
        return layout, ""
    if op in CHANNEL_WISE and first_only:
        return layout, ""
    if op in _GLOBAL_POOLS and first_only and layout == "spatial":
        return "pooled", ""
    if op == "Flatten" and first_only and layout == "pooled" and int_attr(node, "axis", 1) == 1:
        return "flat", ""
    if op in ("Mul", "Add", "Sub", "Div") and len(node.input) == 2:
        if len(inside) == 2 and region[node.input[0]] == region[node.input[1]]:
            return layout, ""  # e.g. x * sigmoid(x), both pruned alike
        return _per_channel_operand(node, 1 - inside[0], layout, cut, inits)
    return None, f"output reaches {op} {name}"


def _per_channel_operand(
    node: onnx.NodeProto,
    index: int,
    layout: str,
    cut: ChannelCut,
    inits: dict[str, onnx.TensorProto],
) -> tuple[str | None, str]:
    """A Mul/Add/Sub/Div with a constant operand: a scalar passes, a per-channel one is cut."""
    other = node.input[index]
    if other not in inits:
        return None, f"{node.op_type} {node.name} mixes the channels with another tensor"
    shape = list(inits[other].dims)
    size = int(np.prod(shape)) if shape else 1
    if size == 1:
        return layout, ""
    axis = len(shape) - (1 if layout == "flat" else 3)
    if axis < 0 or shape[axis] != cut.channels or size != cut.channels:
        return None, f"{node.op_type} {node.name} has an operand of shape {shape}"
    cut.slices.append((other, axis))
    return layout, ""


def shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3].rsplit(", ", 1)[0] + ", ..."


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``prune`` pass."""
    passes.add(Prune())
