"""Pass ``smoothquant``: move the range of a layer's input channels into its weights.

``quantize_dynamic`` rounds each MatMul, Gemm and LSTM input to uint8 with one scale for
the whole tensor, taken from its minimum and maximum at run time. Channels with a wide
range set that scale, and the values of all the others fall on a few levels: ddddocr's
OCR LSTM reads inputs in [-8, 8] whose median magnitude is 0.56, and that rounding alone
changed 3.3% of its decoded texts (with the float LSTM left as it was).

SmoothQuant (Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models") divides each input channel ``c`` by
``s_c = max|x_c|^alpha / max|w_c|^(1 - alpha)`` and multiplies the weights that read it by
``s_c``. The float model computes the same function; the quantized one rounds every
channel on a scale nearer its own, while the weights (rounded per output channel) take
on part of the spread. On that LSTM (alpha 0.5, 64 calibration captchas), dynamic int8
then kept 299 of 300 texts instead of 292.

The division is one ``Mul`` inserted before the layers that read the input (one per
distinct input, shared by the layers reading it): an elementwise product on the
activation, small beside the product with the weights. A weight several selected layers
read (an RNN unrolled into a MatMul per step) takes one set of scales, and every input
it reads is divided by them (one initializer, one ``Mul`` per input). An LSTM's
recurrent weights are left alone (the hidden state they read lives inside the
operator), as is a weight something else reads too (a subgraph, a layer not selected);
a node that is not a selected layer keeps reading the unscaled input.

Calibration is one run over the data keeping each channel's running maximum: memory in
proportion to the channels, not the samples. Put it before ``gptq`` and
``quantize_dynamic``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.modelfile import all_nodes, with_outputs
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins import quantization as q
from slimfleet.plugins.layerweights import Weight, fetch, layer_weights, width
from slimfleet.plugins.onnxgraph import copy_model, describe_counts

SUPPORTED = ("Gemm", "LSTM", "MatMul")
SCALE_LIMIT = 1e4
"""No channel is scaled by more than this, or less than its inverse (a dead channel or
weight column would otherwise ask for a scale of 0 or infinity)."""


class SmoothQuant(Pass):
    name = "smoothquant"
    description = (
        "divides MatMul/Gemm/LSTM input channels by per-channel scales moved into the "
        "weights (SmoothQuant), from calibration data; put it before quantize_dynamic, "
        "whose per-tensor activation rounding it makes finer"
    )
    options = (
        q.op_types_option(SUPPORTED),
        Option(
            "alpha",
            float,
            0.5,
            "how much of the inputs' range moves into the weights: 0 none, 1 all",
        ),
        q.EXCLUDE_NODES,
    )

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        if not context.calibration:
            return "needs calibration data"
        if not 0.0 <= options["alpha"] <= 1.0:
            return f"alpha must be between 0 and 1, got {options['alpha']}"
        nodes, reason = q.targets(model, options["op_types"], SUPPORTED, options["exclude_nodes"])
        if reason:
            return reason
        if not _groups(model, nodes):
            return (
                "no MatMul, Gemm or LSTM node reads data through float32 weights of its "
                "own in an initializer"
            )
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        out = copy_model(model)
        nodes = q.selected(out, options["op_types"], SUPPORTED, options["exclude_nodes"])
        groups = _groups(out, nodes)
        peaks = _input_peaks(out, groups, context)
        inits = {t.name: t for t in out.graph.initializer}
        names = _Names(out.graph)
        largest = 1.0
        for group in groups:
            inputs = np.max([peaks[source] for source in group.sources], axis=0)
            scales = _scales(inputs, _weight_peaks(group.weights, inits), options["alpha"])
            for weight in {(w.tensor, w.direction): w for w in group.weights}.values():
                tensor = inits[weight.tensor]
                array = numpy_helper.to_array(tensor).copy()
                weight.write(array, weight.rows(array) * scales)
                tensor.CopyFrom(numpy_helper.from_array(array, weight.tensor))
            inverse = names.take(f"{group.sources[0]}__smooth_inv")
            out.graph.initializer.append(
                numpy_helper.from_array((1.0 / scales).astype(np.float32), inverse)
            )
            for source in group.sources:
                readers = [w.node for w in group.weights if w.source == source]
                _divide_input(out, source, inverse, readers, names)
            largest = max(largest, float(np.max(np.maximum(scales, 1 / scales))))
        counts = Counter(op for _, op in {(w.node, w.op_type) for g in groups for w in g.weights})
        notes = (
            f"scaled the input channels of {describe_counts(counts)} (alpha "
            f"{options['alpha']:g}, {len(context.calibration)} samples; largest change "
            f"{largest:.3g}x)"
        )
        return PassResult(out, changed=True, notes=notes)


@dataclass
class _Group:
    """Weights that take one set of scales, and the inputs they read. A weight several
    nodes read (an RNN unrolled into a Gemm per step) ties their inputs together, and an
    input several weights read ties those weights."""

    weights: list[Weight] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(w.source for w in self.weights))


def _groups(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[_Group]:
    """The weights to scale: every selected layer's data-side weights (not an LSTM's
    recurrent ones) that only selected layers read (in a subgraph neither), grouped."""
    weights, states = layer_weights(model, nodes)
    weights = [w for w in weights if w.source not in states]
    reads = Counter(name for node in all_nodes(model.graph) for name in node.input)
    outputs = {o.name for o in model.graph.output}
    users: dict[str, set[str]] = {}
    for weight in weights:
        users.setdefault(weight.tensor, set()).add(weight.node)
    weights = [
        w for w in weights if reads[w.tensor] == len(users[w.tensor]) and w.tensor not in outputs
    ]
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for weight in weights:
        parent[root(f"t:{weight.tensor}")] = root(f"s:{weight.source}")
    groups: dict[str, _Group] = {}
    for weight in weights:
        groups.setdefault(root(f"s:{weight.source}"), _Group()).weights.append(weight)
    return list(groups.values())


def _input_peaks(
    model: onnx.ModelProto, groups: list[_Group], context: PassContext
) -> dict[str, np.ndarray]:
    """Each input's largest magnitude per channel (its last axis) over the calibration data."""
    inits = {t.name: t for t in model.graph.initializer}
    sizes = {s: width(g.weights[0], inits) for g in groups for s in g.sources}
    sources = list(sizes)
    session = open_session(with_outputs(model, sources).SerializeToString(), context.threads)
    peaks = {s: np.zeros(size, np.float64) for s, size in sizes.items()}
    for feed in context.calibration:
        for source, value in zip(sources, fetch(session, sources, feed), strict=True):
            rows = np.asarray(value).reshape(-1, len(peaks[source]))
            if len(rows):  # the sample's own dtype: no float64 copy of the activation
                np.fmax(peaks[source], np.abs(rows).max(axis=0), out=peaks[source])
    return peaks


def _weight_peaks(weights: list[Weight], inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The largest weight magnitude per input channel, over ``weights``."""
    columns = [
        np.abs(weight.rows(numpy_helper.to_array(inits[weight.tensor]))).max(axis=0)
        for weight in weights
    ]
    return np.max(columns, axis=0).astype(np.float64)


def _scales(inputs: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel scales, 1 where a channel or its weights are all zero or
    not finite, and within [1/SCALE_LIMIT, SCALE_LIMIT]."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scales = inputs**alpha / weights ** (1.0 - alpha)
    usable = np.isfinite(scales) & (scales > 0) & (inputs > 0) & (weights > 0)
    scales = np.where(usable, scales, 1.0)
    return np.clip(scales, 1 / SCALE_LIMIT, SCALE_LIMIT).astype(np.float32)


class _Names:
    """Fresh value names in ``graph``: ``take(base)`` returns ``base``, or ``base`` with the
    first number that makes it unused, and marks it used."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = {o for n in graph.node for o in n.output}
        self.taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}

    def take(self, base: str) -> str:
        name = next(
            f"{base}{i or ''}"
            for i in range(len(self.taken) + 1)
            if f"{base}{i or ''}" not in self.taken
        )
        self.taken.add(name)
        return name


def _divide_input(
    model: onnx.ModelProto, source: str, inverse: str, readers: list[str], names: _Names
) -> None:
    """Insert ``source * inverse`` before the first of the nodes ``readers`` (keyed by
    name, else first output) and make them read it."""
    graph = model.graph
    name = names.take(f"{source}__smoothed")
    wanted = set(readers)
    positions = [i for i, n in enumerate(graph.node) if (n.name or n.output[0]) in wanted]
    for i in positions:
        if graph.node[i].input[0] == source:
            graph.node[i].input[0] = name
    graph.node.insert(positions[0], helper.make_node("Mul", [source, inverse], [name], name=name))


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``smoothquant`` pass."""
    passes.add(SmoothQuant())
