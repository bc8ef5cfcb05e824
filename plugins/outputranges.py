"""Outputs that concatenate values of different ranges, which one 8-bit scale cannot carry.

A detector's head ends in a Concat of box coordinates in pixels (0-640) and class
probabilities (0-1). Static int8 gives the Concat's output one scale, fitted to the
pixels: 2.5 per step at 640, so every probability rounds to 0 or 2.5 and the detector
finds nothing, while the output as a whole still has a cosine of 0.999 to the original's.
The same holds for any output assembled from parts its user reads apart.

:func:`mixed_output_tails` finds, on a QDQ model, the tensors between each graph output
and the Concats feeding it through data movement only (Reshape, Transpose...) when one of
those Concats joins parts whose scales differ by :data:`MIXED_RANGE` or more. Keeping
them in float (:func:`~slimfleet.plugins.sentinels.keep_float`) costs nothing in speed:
data movement has no arithmetic, and the output is dequantized for its user anyway. The
Concat's parts that only it reads stay float too when a light op made them (320n's
Sigmoid and Mul: a float Sigmoid instead of QLinearSigmoid, within timing noise there).
"""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper

from slimfleet.plugins.onnxgraph import consumers, has_subgraphs, producers

MIXED_RANGE = 16.0
"""Scale ratio from which a Concat's smallest part loses 4 of its 8 bits under the
largest one's scale (320n: boxes 1.27 per step, probabilities 0.0039: 325x)."""
DATA_MOVEMENT = frozenset(
    {"Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
)
"""Ops that move values without arithmetic: a tail of them reaches the output unchanged."""
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def mixed_output_tails(model: onnx.ModelProto) -> list[str]:
    """Float tensors from each mixed-range Concat down to the graph output it feeds
    through data movement: the inputs of their QuantizeLinear nodes, or the graph
    output's name (its DequantizeLinear's); and the Concat's parts whose quantized
    copies only it reads. Nothing further up is named, so the operators computing the
    parts keep their quantized inputs. Each tensor is visited once."""
    graph = model.graph
    made_by = producers(graph)
    initializers = {i.name: i for i in graph.initializer}

    def unquantized(tensor: str) -> tuple[str, float | None]:
        """The float tensor behind a Q -> DQ copy, and the copy's scale (None when
        ``tensor`` is not such a copy or the scale is not one constant)."""
        dequant = made_by.get(tensor)
        if dequant is None or dequant.op_type != "DequantizeLinear":
            return tensor, None
        quant = made_by.get(dequant.input[0])
        if quant is None or quant.op_type != "QuantizeLinear":
            return tensor, None
        scale = initializers.get(dequant.input[1])
        if scale is None or math.prod(scale.dims) != 1:
            return quant.input[0], None
        return quant.input[0], float(numpy_helper.to_array(scale).reshape(-1)[0])

    subgraphs = has_subgraphs(model)
    readers = consumers(graph)

    def unquantized_source(tensor: str) -> str | None:
        """The float tensor behind ``tensor`` when it is a Q -> DQ copy, else None."""
        source, scale = unquantized(tensor)
        return source if scale is not None else None

    def only_for(source: str | None, concat: onnx.NodeProto) -> bool:
        """Every dequantized copy of ``source`` is read by ``concat`` alone, and a light
        op made it: quantized, it can clip what matters (a detector's scores, calibrated
        on their 99.99th percentile of mostly background), and it only lets that op run
        as an integer kernel (QLinearSigmoid). A Conv, Gemm or MatMul keeps its pair:
        its integer kernel needs it. Never in a model with subgraphs, whose readers
        this does not see."""
        producer = made_by.get(source) if source is not None else None
        if producer is None or producer.op_type in WEIGHTED or subgraphs:
            return False
        copies = [
            reader
            for quant, _ in readers.get(source, [])
            if quant.op_type == "QuantizeLinear"
            for dequant, _ in readers.get(quant.output[0], [])
            for reader, _ in readers.get(dequant.output[0], [])
        ]
        return bool(copies) and all(reader is concat for reader in copies)

    kept: set[str] = set()
    seen: set[str] = set()
    for output in graph.output:
        pending = [(output.name, ())]  # a tensor and the tail's tensors below it
        while pending:
            tensor, below = pending.pop()
            source, scale = unquantized(tensor)
            node = made_by.get(source)
            if tensor in seen or node is None or node.op_type not in DATA_MOVEMENT:
                continue
            seen.add(tensor)
            here = (*below, tensor if tensor == output.name else source) if scale else below
            data = list(node.input) if node.op_type == "Concat" else list(node.input[:1])
            if node.op_type == "Concat":
                parts = [s for s in (unquantized(i)[1] for i in data) if s]
                if here and len(parts) >= 2 and max(parts) >= MIXED_RANGE * min(parts):
                    kept.update(here)
                    kept.update(p for p in map(unquantized_source, data) if only_for(p, node))
            pending += [(name, here) for name in data]
    return sorted(kept)
