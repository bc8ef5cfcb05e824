"""Arithmetic whose operands need more than 8 bits: differences far smaller than their
terms, and what a reciprocal, a division or a log reads.

A LayerNorm written out in elementary ops (TensorFlow and JAX exports; the corpus's
magika) takes the variance as ``E[x^2] - E[x]^2``. Static int8 rounds each term at a step
fitted to its own size, and when the mean is large beside the spread, the difference is
a few of those steps: magika's variance came out as noise, and static int8 agreed with
fp32's top-1 file type on 13.5% of 400 real files (97% with both rules here).

:func:`cancelling_nodes` finds, on calibration samples, each Sub or Add of two computed
(not constant) inputs whose largest magnitude is :data:`CANCELLATION` times its
result's or more on some sample. :func:`cancellation_regions` names what the rounding of which would
reach that result magnified: the tensors between the node and the nearest tensors both
its inputs come from (for the variance: the two sums, the mean and the two squares,
not ``x``, whose rounding only adds its step's noise to the variance). Kept float by
:func:`~slimfleet.plugins.sentinels.keep_float`, they cost only their light ops' integer
kernels; the walk never enters a Conv, Gemm or MatMul, whose integer kernels need their
pairs.

The same LayerNorm then divides by ``sqrt(variance + 1e-6)``. Quantized, a small variance
rounds to 0 and its reciprocal is infinite (onnxruntime saturates it; training through it
gives NaN gradients). A log-mel front end's ``log(mel + 1e-6)`` meets the same zero: every
frame quieter than half a step of the loud ones' scale reads ``log(0)``, and so does
every power spectrum value before it, wherever the chain is rounded: 8 bits cannot carry
six decades. These ops are singular at 0. :func:`singular_chains` names what a
Reciprocal, a Div's divisor, a negative Pow or a Log reads, and up from it through ops of
one computed operand (pointwise ops, data movement, and one Conv, Gemm or MatMul of
constant weights) to and with the tensor an op of several computed operands, a reduction
or a second weighted node made, or a graph input. On magika that is a few light ops; on a log-mel front end, the front
end runs in float (its filterbank MatMul too) and the network after the Log in int8.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.modelfile import constant_value, with_outputs
from slimfleet.host.compress.planning import batch_bytes
from slimfleet.host.compress.tensorsizes import batches, tensor_bytes
from slimfleet.plugins.layerweights import fetch
from slimfleet.plugins.onnxgraph import has_subgraphs, producers
from slimfleet.plugins.outputranges import WEIGHTED

Feed = dict[str, np.ndarray]

CANCELLATION = 16.0
"""Term-to-result magnitude ratio from which the terms' 8-bit rounding leaves the result
4 bits or fewer (magika's LayerNorm variance: about 30x)."""
SAMPLES = 4
"""Calibration samples the magnitudes are measured on, one float run each. A difference
cancels on some samples, not all: magika's two LayerNorms each on one of its first four
files, and not at all once a sample with a larger variance set the output's peak."""
DIFFERENCES = frozenset({"Sub", "Add"})
SHAPE_ONLY = frozenset({"Shape", "Size"})
"""Ops that read only their input's shape: the walk does not go through them."""
POINTWISE = frozenset(
    {"Sqrt", "Abs", "Neg", "Cast", "Identity", "Add", "Sub", "Mul", "Div", "Max", "Min"}
    | {"Clip", "Relu", "Pow", "Reshape", "Expand", "Squeeze", "Unsqueeze", "Transpose"}
    | {"Flatten", "Tile", "Slice", "Gather"}
)
"""Ops a singular chain goes up through when they have one computed float operand (the
others constants or shapes): a value near 0 after them was near 0 before, so rounding
before them reaches the singular op. Not Exp, Sigmoid and the like: their input's
rounding error becomes a bounded relative error (SiLU written as ``x / (1 + exp(-x))``
keeps ``1 + exp(-x)`` and ``exp(-x)`` float, not the convolution before them). The walk
goes through one Conv, Gemm or MatMul of constant weights too: its input's rounding
reaches the singular op as surely (a filterbank), and one is where it stops (a CNN
ending in a log keeps its other layers in int8)."""
DATA_FIRST = frozenset({"Reshape", "Expand", "Tile", "Slice", "Gather", "Squeeze", "Unsqueeze"})
"""Data movement whose operands after the first say where, not what."""


def cancelling_nodes(
    model: onnx.ModelProto,
    calibration: Sequence[Feed],
    threads: int = 1,
    memory: int | None = None,
    rounded: Collection[str] | None = None,
) -> list[onnx.NodeProto]:
    """The main graph's Sub and Add nodes of two computed float inputs whose largest
    magnitude is :data:`CANCELLATION` times their output's or more on one of the first
    :data:`SAMPLES` calibration samples (a sample it cancels on is a sample it gets
    wrong). With ``rounded`` (the tensors a quantized model rounds), only differences
    whose :func:`cancellation_regions` hold one of them are measured: the others' terms
    stay float anyway (their ops were left out, or their tensors are integers). None in
    a model with subgraphs, whose readers this does not see, or without calibration
    samples. The inputs and outputs read are fetched in
    groups whose estimated size stays within a batch of ``memory`` (the search's limit
    for one child; see :func:`~slimfleet.host.compress.planning.batch_bytes`), one float
    run per sample and group."""
    graph = model.graph
    constant = _constant_tensors(graph)
    candidates = [
        node
        for node in graph.node
        if node.op_type in DIFFERENCES
        and len(node.input) == 2
        and not any(name in constant for name in node.input)
        and node.input[0] != node.input[1]
    ]
    if rounded is not None:
        regions = cancellation_regions(model, candidates)
        candidates = [n for n, r in zip(candidates, regions, strict=True) if r & set(rounded)]
    if not candidates or not calibration or has_subgraphs(model):
        return []
    tapped = list(dict.fromkeys(t for n in candidates for t in (*n.input, n.output[0])))
    samples = calibration[:SAMPLES]
    peak = {name: np.zeros(len(samples)) for name in tapped}  # per sample
    sizes = tensor_bytes(model, calibration[0], tapped)
    for group in batches(sizes, batch_bytes(memory)):
        session = open_session(with_outputs(model, group).SerializeToString(), threads)
        for index, feed in enumerate(samples):
            for name, value in zip(group, fetch(session, group, feed), strict=True):
                value = np.asarray(value)
                if value.dtype.kind == "f":  # finite values: a mask's -inf is the sentinels'
                    finite = np.abs(value[np.isfinite(value)])
                    peak[name][index] = float(finite.max()) if finite.size else 0.0
    found = []
    for node in candidates:
        terms = np.maximum(peak[node.input[0]], peak[node.input[1]])
        if ((terms > 0) & (terms >= CANCELLATION * peak[node.output[0]])).any():
            found.append(node)
    return found


def cancellation_regions(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> list[set[str]]:
    """For each of ``nodes``, the tensors from its inputs up to, not including, the
    tensors both inputs are computed from, stopping at graph inputs (named: their pairs go
    too), constants, shapes (Shape, Size) and the outputs of Conv, ConvTranspose, Gemm
    and MatMul nodes (left out: their integer kernels need their pairs). Inputs computed
    from nothing in common: every tensor up to those stops."""
    graph = model.graph
    made_by = producers(graph)
    constant = _constant_tensors(graph)

    def upward(start: str, stop: set[str]) -> set[str]:
        """``start`` and the tensors it is computed from, walking no further than
        ``stop``, graph inputs, constants, shapes and weighted nodes' outputs."""
        found: set[str] = set()
        pending = [start]
        while pending:
            tensor = pending.pop()
            producer = made_by.get(tensor)
            if tensor in found or tensor in stop or tensor in constant:
                continue
            if producer is not None and producer.op_type in WEIGHTED | SHAPE_ONLY:
                continue
            found.add(tensor)  # a graph input too
            pending += _data_inputs(producer, constant) if producer is not None else []
        return found

    regions = []
    for node in nodes:
        first, second = node.input
        shared = upward(first, set()) & upward(second, set())
        regions.append(upward(first, shared) | upward(second, shared))
    return regions


def singular_chains(model: onnx.ModelProto) -> set[str]:
    """The tensors a Reciprocal, a Div's divisor, a Pow with a negative constant exponent
    or a Log reads (they are infinite at 0), and up from each through :data:`POINTWISE`
    ops and at most one Conv, Gemm or MatMul of one computed operand, to and with the
    tensor another op made (a reduction, a difference, a second weighted node) or a
    graph input. None in a model with subgraphs."""
    if has_subgraphs(model):
        return set()
    graph = model.graph
    made_by = producers(graph)
    constant = _constant_tensors(graph)
    found: set[str] = set()
    # a tensor is walked from once with no weighted node crossed on the way, and once
    # with one crossed only if not reached otherwise: the result is the same in any order
    pending = [(t, False) for node in graph.node if (t := _singular_operand(node, constant))]
    walked: set[tuple[str, bool]] = set()
    while pending:
        tensor, crossed = pending.pop()
        if (tensor, False) in walked or (tensor, crossed) in walked or tensor in constant:
            continue
        walked.add((tensor, crossed))
        producer = made_by.get(tensor)
        if producer is None:  # a graph input: its pair goes too
            found.add(tensor)
            continue
        if producer.op_type in SHAPE_ONLY:
            continue
        found.add(tensor)
        data = _data_inputs(producer, constant)
        weighted = producer.op_type in WEIGHTED
        if len(data) == 1 and (producer.op_type in POINTWISE or (weighted and not crossed)):
            pending.append((data[0], crossed or weighted))
    return found


def _data_inputs(node: onnx.NodeProto, constant: Container[str]) -> list[str]:
    """``node``'s computed operands: not constants, and not the shape, index or bound
    operands of data movement (Reshape's shape, Slice's starts...)."""
    data = node.input[:1] if node.op_type in DATA_FIRST else node.input
    return list(dict.fromkeys(name for name in data if name and name not in constant))


def _singular_operand(
    node: onnx.NodeProto, values: dict[str, onnx.TensorProto | None]
) -> str | None:
    """The computed operand at whose 0 ``node`` is infinite: a Reciprocal's or a Log's
    input, a Div's divisor, a Pow's base when its exponent is a constant holding a
    negative value."""
    operand = ""
    if node.op_type in ("Reciprocal", "Log"):
        operand = node.input[0]
    elif node.op_type == "Div" and len(node.input) == 2:
        operand = node.input[1]
    elif node.op_type == "Pow" and len(node.input) == 2:
        exponent = values.get(node.input[1])
        if exponent is not None and bool((numpy_helper.to_array(exponent) < 0).any()):
            operand = node.input[0]
    return operand if operand and operand not in values else None


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """Initializers and Constant nodes' outputs by name, with their tensors where they can
    be read (a sparse or string Constant maps to None)."""
    tensors: dict[str, onnx.TensorProto | None] = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = constant_value(node)
    return tensors
