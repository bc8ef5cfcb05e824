"""Pass ``gptq``: round MatMul, Gemm and LSTM weights onto the int8 grid, compensating errors.

Round-to-nearest int8 makes every weight's error independent; on a sensitive model the
errors add up (ddddocr's OCR LSTM: its decoded text changed on 3.5% of captchas with only
the LSTM's weights rounded to int8, and on 1.3% even at 9 bits). GPTQ (Frantar et al.,
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") rounds one input column at a time and moves each column's rounding error
onto the columns not yet rounded, weighted by the inverse of the layer inputs' second
moments ``H = sum x x^T`` over the calibration data, so the layer's *outputs* stay close,
not its weights. Then, like NNCF's fast bias correction, the mean output error left over
(``dW @ mean(x)``) is subtracted from the bias where the layer has one.

The result is a float model whose weights lie exactly on the grid ``quantize_dynamic``
computes for int8 weights (symmetric, ``scale = max|w| / 127``; per output channel with
``per_channel``), so that pass keeps these integers instead of rounding again. Each
channel's largest weight is never moved, so the scale it implies stays put. Run it right
before ``quantize_dynamic`` with the same ``per_channel``; alone it only makes a float
model worse.

A weight several nodes read (an RNN unrolled into a Gemm per step) is rounded once,
for all its uses: its matrix sums the inputs of every node reading it.

Memory: one ``K x K`` float64 matrix per distinct set of inputs a weight reads (layers
reading the same input share it; an LSTM adds one per direction for its recurrent
weights), accumulated one calibration sample at a time; the layers are taken in groups
whose matrices fit in a quarter of the pass's memory limit, one run over the
calibration data per group. The recurrent weights' inputs are the
previous hidden states, read from the LSTM's output ``Y`` (zeros before the first step;
``sequence_lens`` is not looked at).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.modelfile import with_outputs
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins import quantization as q
from slimfleet.plugins.layerweights import (
    LstmState,
    Weight,
    fetch,
    layer_weights,
    name_lstm_outputs,
    width,
)
from slimfleet.plugins.onnxgraph import copy_model, describe_counts

SUPPORTED = ("Gemm", "LSTM", "MatMul")
QMAX = 127
"""Symmetric int8 as onnxruntime quantizes weights: integers -127..127."""
BLOCK = 128
"""Columns rounded together before their errors are pushed to the rest (GPTQ's lazy batch)."""
HESSIAN_SHARE = 4
"""The matrices of one group may take 1/HESSIAN_SHARE of the pass's memory limit."""
UNLIMITED_MEMORY = 4 << 30
"""What the pass plans with when it has no memory limit."""


@dataclass
class Moments:
    """Running ``sum x x^T``, ``sum x`` and row count of one layer input, in float64."""

    size: int
    gram: np.ndarray = field(init=False)
    total: np.ndarray = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.size, self.size))
        self.total = np.zeros(self.size)

    def add(self, values: np.ndarray) -> None:
        rows = values.reshape(-1, self.size).astype(np.float64)
        self.gram += rows.T @ rows
        self.total += rows.sum(axis=0)
        self.count += len(rows)

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


class Gptq(Pass):
    name = "gptq"
    description = (
        "rounds MatMul/Gemm/LSTM weights onto the int8 grid with GPTQ's error compensation "
        "and corrects biases, from calibration data; put it right before quantize_dynamic "
        "(int8 weights), which then keeps these integers"
    )
    options = (
        q.op_types_option(SUPPORTED),
        Option("per_channel", bool, True, "one scale per output channel, as quantize_dynamic's"),
        Option("damp", float, 0.01, "added to the diagonal of H, as a share of its mean"),
        Option("bias_correction", bool, True, "subtract the mean output error from biases"),
        q.EXCLUDE_NODES,
    )

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        if not context.calibration:
            return "needs calibration data"
        if not options["damp"] > 0:
            return f"damp must be > 0, got {options['damp']}"
        nodes, reason = q.targets(model, options["op_types"], SUPPORTED, options["exclude_nodes"])
        if reason:
            return reason
        if not layer_weights(model, nodes)[0]:
            return "no MatMul, Gemm or LSTM node has float32 weights in an initializer"
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        out = copy_model(model)
        name_lstm_outputs(out)
        nodes = q.selected(out, options["op_types"], SUPPORTED, options["exclude_nodes"])
        weights, states = layer_weights(out, nodes)
        inits = {t.name: t for t in out.graph.initializer}
        budget = (context.memory or UNLIMITED_MEMORY) // HESSIAN_SHARE
        for group in _groups(_shared(weights), inits, budget):
            moments = _moments(out, group, states, context)
            for weight, sources in group:
                _round(weight, inits, moments[sources], options)
        counts = Counter(op for _, op in dict.fromkeys((w.node, w.op_type) for w in weights))
        notes = (
            f"rounded the weights of {describe_counts(counts)} onto the int8 grid "
            f"({len(context.calibration)} samples)"
        )
        return PassResult(out, changed=True, notes=notes)


Sources = tuple[str, ...]
"""The tensors whose values one weight matrix reads: one, or one per node sharing it (an
RNN unrolled into a Gemm per step)."""


def _shared(weights: list[Weight]) -> list[tuple[Weight, Sources]]:
    """Each weight matrix once (the first node reading it stands for all), with the
    inputs of every node that reads it: GPTQ then rounds it for all its uses at once."""
    readers: dict[tuple[str, int | None], list[Weight]] = {}
    for weight in weights:
        readers.setdefault((weight.tensor, weight.direction), []).append(weight)
    return [(ws[0], tuple(dict.fromkeys(w.source for w in ws))) for ws in readers.values()]


def _groups(
    weights: list[tuple[Weight, Sources]], inits: dict[str, onnx.TensorProto], budget: int
) -> list[list[tuple[Weight, Sources]]]:
    """Consecutive weights whose distinct inputs' matrices fit ``budget`` bytes together
    (a single one that does not fit is a group of its own)."""
    groups: list[list[tuple[Weight, Sources]]] = []
    sizes: dict[Sources, int] = {}
    for weight, sources in weights:
        size = width(weight, inits) ** 2 * 8
        new = sources not in sizes
        if groups and (not new or sum(sizes.values()) + size <= budget):
            groups[-1].append((weight, sources))
        else:
            groups.append([(weight, sources)])
            sizes = {}
        sizes[sources] = size
    return groups


def _moments(
    model: onnx.ModelProto,
    group: list[tuple[Weight, Sources]],
    states: dict[str, LstmState],
    context: PassContext,
) -> dict[Sources, Moments]:
    """The second moments of the inputs of every weight in ``group`` (all its readers'
    inputs stacked), over the calibration data."""
    inits = {t.name: t for t in model.graph.initializer}
    sizes = {sources: width(weight, inits) for weight, sources in group}
    every = list(dict.fromkeys(s for sources in sizes for s in sources))
    tapped = list(dict.fromkeys(states[s].y if s in states else s for s in every))
    session = open_session(with_outputs(model, tapped).SerializeToString(), context.threads)
    moments = {sources: Moments(size) for sources, size in sizes.items()}
    for feed in context.calibration:
        values = dict(zip(tapped, fetch(session, tapped, feed), strict=True))
        for source in every:
            if source in states:
                values[source] = states[source].previous(values[states[source].y])
        for sources, moment in moments.items():
            rows = [np.reshape(values[s], (-1, moment.size)) for s in sources]
            moment.add(rows[0] if len(rows) == 1 else np.concatenate(rows))
    return moments


def _round(
    weight: Weight,
    inits: dict[str, onnx.TensorProto],
    moments: Moments,
    options: dict[str, Any],
) -> None:
    """Replace ``weight``'s values by their GPTQ rounding, and correct its bias."""
    tensor = inits[weight.tensor]
    array = numpy_helper.to_array(tensor).copy()
    rows = weight.rows(array).astype(np.float64)
    limit = np.abs(array).max() if not options["per_channel"] else None
    rounded = gptq_rows(rows, moments.gram, options["damp"], limit)
    weight.write(array, rounded.astype(array.dtype))
    tensor.CopyFrom(numpy_helper.from_array(array, weight.tensor))
    if weight.bias and options["bias_correction"]:
        name, start, stop = weight.bias
        bias = numpy_helper.to_array(inits[name]).copy()
        flat = bias.reshape(-1)
        flat[start:stop] -= ((rounded - rows) @ moments.mean()).astype(bias.dtype)
        inits[name].CopyFrom(numpy_helper.from_array(flat.reshape(bias.shape), name))


def gptq_rows(
    rows: np.ndarray, gram: np.ndarray, damp: float, limit: float | None = None
) -> np.ndarray:
    """GPTQ of ``rows`` [out, in] given ``gram`` = sum x x^T of the inputs [in, in].

    The grid is symmetric int8 with one scale per row (``max|row| / 127``) or, with
    ``limit``, one for all (``limit / 127``). The largest weight of each row (with
    ``limit``: the largest of all) is never moved, so the grid's scale stays what it was.
    """
    order = np.argsort(-np.diag(gram), kind="stable")  # largest inputs first ("act order")
    work = rows.astype(np.float64)[:, order]
    gram = gram[np.ix_(order, order)]
    size = work.shape[1]
    peak = np.abs(work).max(axis=1) if limit is None else np.full(len(work), float(limit))
    scale = np.where(peak > 0, peak / QMAX, 1.0)[:, None]
    keep_rows = np.flatnonzero(np.abs(work).max(axis=1) == peak)
    keep_cols = np.abs(work[keep_rows]).argmax(axis=1)
    kept = work[keep_rows, keep_cols].copy()
    hessian = gram.astype(np.float64).copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian += np.eye(size) * damp * np.mean(np.diag(hessian))
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T
    out = np.empty_like(work)
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        block = work[:, start:stop].copy()
        errors = np.empty_like(block)
        inner = upper[start:stop, start:stop]
        later = (keep_cols >= start) & (keep_cols < stop)
        for i in range(stop - start):
            column = block[:, i]
            quantized = np.clip(np.round(column / scale[:, 0]), -QMAX, QMAX) * scale[:, 0]
            out[:, start + i] = quantized
            errors[:, i] = (column - quantized) / inner[i, i]
            block[:, i + 1 :] -= np.outer(errors[:, i], inner[i, i + 1 :])
            pinned = later & (keep_cols > start + i)
            block[keep_rows[pinned], keep_cols[pinned] - start] = kept[pinned]
        work[:, stop:] -= errors @ upper[start:stop, stop:]
        pinned = keep_cols >= stop
        work[keep_rows[pinned], keep_cols[pinned]] = kept[pinned]
    return out[:, np.argsort(order)]


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``gptq`` pass."""
    passes.add(Gptq())
