"""Activations int8 cannot carry: masks and other sentinel values, kept in float.

A model that masks attention writes ``-inf``, ``-1e9`` or float32's lowest value into
its scores (PyTorch's ``masked_fill``). onnxruntime's histogram calibrators refuse
non-finite values outright ("autodetected range of [0.0, inf] is not finite"), and
min-max stretches one 8-bit scale over 1e9, which rounds every real score to zero.
Such a tensor stays float: while calibrating, :class:`SentinelWatch` records it by name
and hands the calibrator zeros in its place, and :func:`keep_float` then takes its
QuantizeLinear/DequantizeLinear pair out of the quantized graph. The bound is float16's
largest value: an activation beyond it is a sentinel, not a signal (models run in fp16
keep theirs below it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from slimfleet.plugins.onnxgraph import consumers

CARRIABLE = 65504.0
"""float16's largest finite value: larger magnitudes (and inf, NaN) are sentinels."""


def cannot_carry(value: Any) -> bool:
    """Whether a float array holds a value beyond :data:`CARRIABLE`, an inf or a NaN."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.size == 0:
        return False
    return not bool((np.abs(value) <= CARRIABLE).all())  # False for NaN as well


class SentinelWatch:
    """Stands in for a calibrator's inference session: every output that
    :func:`cannot_carry` is recorded in :attr:`names` and replaced by zeros of its shape,
    so the calibrator computes a harmless range for a tensor that will stay float.
    ``suffixes``: what the calibrator appends to a tensor's name in its outputs
    (onnxruntime's min-max calibrator reads ``<tensor>_ReduceMin`` and ``_ReduceMax``)."""

    def __init__(self, session: Any, suffixes: tuple[str, ...] = ()) -> None:
        self._session = session
        self._suffixes = suffixes
        self.names: set[str] = set()

    def __getattr__(self, name: str) -> Any:  # everything but run: the real session's
        return getattr(self._session, name)

    def run(self, output_names: list[str] | None, feed: Any, *args: Any, **kwargs: Any) -> list:
        outputs = list(self._session.run(output_names, feed, *args, **kwargs))
        names = output_names or [o.name for o in self._session.get_outputs()]
        for i, (name, value) in enumerate(zip(names, outputs, strict=True)):
            if cannot_carry(value):
                self.names.add(self._tensor(name))
                outputs[i] = np.zeros_like(value)
        return outputs

    def _tensor(self, output: str) -> str:
        for suffix in self._suffixes:
            if output.endswith(suffix):
                return output[: -len(suffix)]
        return output


def keep_float(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """Take the QuantizeLinear -> DequantizeLinear pairs on ``names`` out of ``model``
    (in place): whatever read the dequantized copy reads the float tensor itself. A graph
    output is named by its DequantizeLinear (onnxruntime renames the tensor feeding its
    QuantizeLinear); it keeps its name. Returns the names that had such a pair, sorted."""
    graph, wanted = model.graph, set(names)
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    kept: set[str] = set()
    for quant in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        copies = readers.get(quant.output[0], [])
        dequants = [r for r, _ in copies if r.op_type == "DequantizeLinear"]
        if len(dequants) != len(copies):
            continue  # an integer reader (a QLinear op) needs the quantized tensor
        source = quant.input[0]
        found = ({source} | {d.output[0] for d in dequants} & outputs) & wanted
        if not found:
            continue
        for dequant in dequants:
            copy = dequant.output[0]
            if copy in outputs:  # the float tensor takes the output's name
                _rename(graph, source, copy)
                source = copy
            else:
                for reader, index in readers.get(copy, []):
                    reader.input[index] = source
        drop += [quant, *dequants]
        kept |= found
    for node in drop:
        graph.node.remove(node)
    params = {name for node in drop for name in node.input[1:]}  # scales, zero points
    still_read = {name for node in graph.node for name in node.input}
    unread = [i for i in graph.initializer if i.name in params - still_read]
    for initializer in unread:
        graph.initializer.remove(initializer)
    return sorted(kept)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every mention of tensor ``old`` by a node becomes ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
