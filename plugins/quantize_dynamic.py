"""Pass ``quantize_dynamic``: int8 weights, activations quantized at run time (no data needed).

Wraps ``onnxruntime.quantization.quantize_dynamic``. onnxruntime rewrites every Gemm as
MatMul + Add before quantizing, so MatMul and Gemm are one family here. A run that
quantizes nothing (weights stored as Constant nodes) is reported, not hidden.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import quantize_dynamic
from onnxruntime.quantization.registry import IntegerOpsRegistry

from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins import quantization as q
from slimfleet.plugins.onnxgraph import copy_model, or_list

SUPPORTED = (*IntegerOpsRegistry, "Gemm")
_WEIGHT_OPS = (*q.WEIGHT_OPS, "LSTM", "Attention")
"""Op types whose weight (an initializer) is what dynamic quantization shrinks."""


def _ort_op_types(op_types: list[str]) -> list[str]:
    """Gemm is quantized as the MatMul onnxruntime turns it into."""
    ops = ["MatMul" if op == "Gemm" else op for op in op_types]
    return list(dict.fromkeys(ops))


def _ort_exclude(model: onnx.ModelProto, exclude: list[str]) -> list[str]:
    """Excluded Gemm nodes reach the quantizer renamed "<name>_MatMul"."""
    gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
    return exclude + [f"{name}_MatMul" for name in exclude if name in gemms]


class QuantizeDynamic(Pass):
    name = "quantize_dynamic"
    description = (
        "int8 weights with activations quantized at run time (onnxruntime quantize_dynamic); "
        "needs no data; Conv becomes ConvInteger, which is often slower on CPU"
    )
    options = (
        q.op_types_option(SUPPORTED, "; MatMul and Gemm are quantized together"),
        Option("per_channel", bool, False, "one scale per output channel of each weight"),
        Option(
            "weight_type",
            str,
            "int8",
            "8-bit type of the weights",
            choices=("int8", "uint8"),
        ),
        q.EXCLUDE_NODES,
    )

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        op_types, exclude = options["op_types"], options["exclude_nodes"]
        nodes, reason = q.targets(model, _family(op_types), SUPPORTED, exclude)
        if reason:
            return reason
        inits = {t.name for t in model.graph.initializer}
        weighted = [n for n in nodes if n.op_type in _WEIGHT_OPS]
        if weighted and not any(inits.intersection(n.input[1:]) for n in weighted):
            ops = or_list(sorted({n.op_type for n in weighted}))
            return f"no {ops} node has its weights in an initializer (run normalize first)"
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        op_types = _ort_op_types(_family(options["op_types"]))
        given = _earlier_qdq_renamed(model)

        def quantize(source: Path, target: Path) -> None:
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=op_types,
                per_channel=options["per_channel"],
                weight_type=q.quant_type(options["weight_type"]),
                nodes_to_exclude=_ort_exclude(model, options["exclude_nodes"]),
            )

        quantized = q.run_quantizer(given, context, self.name, quantize)
        summary = f"dynamic, {options['weight_type']} weights"
        if options["per_channel"]:
            summary += ", per channel"
        return q.result(model, quantized, summary, options["exclude_nodes"])


QDQ_NAMES = ("_QuantizeLinear", "_DequantizeLinear")
EARLIER = "_earlier"


def _earlier_qdq_renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, its QuantizeLinear/DequantizeLinear nodes from an earlier static pass
    renamed (node names only). onnxruntime's dynamic quantizer names the
    DequantizeLinear it puts after a quantized Gather "<tensor>_DequantizeLinear";
    finding a node of that name already (``int8_combined`` on a transformer: the
    embedding's output was put in QDQ for the Mul after it), it fails an assertion."""
    if not any(n.name.endswith(QDQ_NAMES) for n in model.graph.node):
        return model
    renamed = copy_model(model)
    taken = {n.name for n in renamed.graph.node}
    for node in renamed.graph.node:
        if node.name.endswith(QDQ_NAMES):
            name, count = node.name + EARLIER, 1
            while name in taken:  # a second dynamic pass: the first one's are earlier too
                count += 1
                name = f"{node.name}{EARLIER}{count}"
            taken.add(name)
            node.name = name
    return renamed


def _family(op_types: list[str]) -> list[str]:
    """Selecting MatMul or Gemm selects both, since onnxruntime quantizes them as one."""
    if {"MatMul", "Gemm"} & set(op_types):
        return sorted(set(op_types) | {"MatMul", "Gemm"})
    return op_types


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``quantize_dynamic`` pass."""
    passes.add(QuantizeDynamic())
