"""Values int8 cannot carry: masks and other sentinels, kept in float.

A model that masks attention writes ``-inf``, ``-1e9``, ``-10000`` (BERT, GPT-2) or
float32's lowest value into its scores (PyTorch's ``masked_fill``, or a constant causal
mask). onnxruntime's histogram calibrators refuse non-finite values outright
("autodetected range of [0.0, inf] is not finite"), min-max and the percentile both
stretch one 8-bit scale over the mask and round every real score to one level, and a
constant mask holding ``-inf`` quantized as a weight gets an infinite scale. So:

* an activation seen holding such a value while calibrating stays float:
  :class:`SentinelWatch` records it by name and hands the calibrator the tensor with
  those values set to 0 (the rest as it was: an op that shares its scale, a Slice of
  the real positions, still gets the real range), and :func:`keep_float` then takes its
  QuantizeLinear/DequantizeLinear pair out of the quantized graph;
* a node reading a constant that holds one is not quantized (:func:`constant_readers`).

A sentinel is inf, NaN, or a magnitude of 5000 and up (half the smallest mask value
exporters write) standing at least 10x above the tensor's other values: a mask's 0 and
-10000 do; a real activation that large (magika's cubed GELU input, a LayerNorm's sum
of squares) continues its smaller values or stands alone, and is quantized as before.
NaN counts where the calibrator shows it (onnxruntime's min-max reduction may skip it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimfleet.plugins.onnxgraph import consumers

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
SENTINEL = 5e3
"""Magnitudes from here up can be sentinels (see :func:`sentinels`): half the smallest
mask value exporters write (-10000), so a score plus the mask still counts."""
GAP = 10.0
"""...when they stand this many times above the tensor's largest smaller magnitude."""
WHAT = f"inf, or {SENTINEL:g} and beyond apart from the rest"
"""What counts, as the notes say it."""


def shown(names: list[str], first: int = 3) -> str:
    """``names`` for a note: the first few, then "..."."""
    return ", ".join(names[:first]) + (", ..." if len(names) > first else "")


def sentinels(value: Any) -> np.ndarray | None:
    """Where a float array holds values int8 cannot carry, or None when it holds none:
    inf and NaN, and magnitudes of :data:`SENTINEL` and up that stand apart from the
    rest (at least :data:`GAP` times its largest smaller magnitude; a mask's 0 and
    -10000 do, a cube's continuous tail or a lone large sum does not)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.size == 0:
        return None
    if max(float(value.max()), -float(value.min())) < SENTINEL:  # the common case: no
        return None  # temporaries (a NaN makes the test False and takes the long way)
    magnitude = np.abs(value)
    nonfinite = ~np.isfinite(value)
    small = magnitude < SENTINEL  # False for inf and NaN
    large = ~small & ~nonfinite
    if large.any() and (not small.any() or magnitude[large].min() < GAP * magnitude[small].max()):
        large = np.zeros_like(large)  # a real value: alone, or continuing the others
    odd = nonfinite | large
    return odd if odd.any() else None


class SentinelWatch:
    """Stands in for a calibrator's inference session: every output that
    holds :func:`sentinels` is recorded in :attr:`names` and handed on with them set
    to 0, so the calibrator computes the range of its real values.
    ``suffixes``: what the calibrator appends to a tensor's name in its outputs
    (onnxruntime's min-max calibrator reads ``<tensor>_ReduceMin`` and ``_ReduceMax``);
    the outputs of one tensor are judged together (a mask's min of -10000 stands apart
    from its max of 0 only side by side)."""

    def __init__(self, session: Any, suffixes: tuple[str, ...] = ()) -> None:
        self._session = session
        self._suffixes = suffixes
        self.names: set[str] = set()

    def __getattr__(self, name: str) -> Any:  # everything but run: the real session's
        return getattr(self._session, name)

    def run(self, output_names: list[str] | None, feed: Any, *args: Any, **kwargs: Any) -> list:
        outputs = list(self._session.run(output_names, feed, *args, **kwargs))
        names = output_names or [o.name for o in self._session.get_outputs()]
        groups: dict[str, list[int]] = {}  # a tensor -> its outputs (min-max: two)
        for i, name in enumerate(names):
            groups.setdefault(self._tensor(name), []).append(i)
        for tensor, indices in groups.items():
            values = [outputs[i] for i in indices]
            if not all(isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in values):
                continue
            together = (
                values[0] if len(values) == 1 else np.concatenate([v.ravel() for v in values])
            )
            odd = sentinels(together)
            if odd is None:
                continue
            self.names.add(tensor)
            start = 0
            odd = odd.ravel()
            for i, value in zip(indices, values, strict=True):
                here = odd[start : start + value.size].reshape(value.shape)
                outputs[i] = np.where(here, 0, value).astype(value.dtype)
                start += value.size
        return outputs

    def _tensor(self, output: str) -> str:
        for suffix in self._suffixes:
            if output.endswith(suffix):
                return output[: -len(suffix)]
        return output


def keep_float(model: onnx.ModelProto, names: Iterable[str], *, shared: bool = True) -> list[str]:
    """Take the QuantizeLinear -> DequantizeLinear pairs on ``names`` out of ``model``
    (in place), and with ``shared`` every pair sharing their scale (onnxruntime gives a
    Slice, Reshape or MaxPool output its input's, which min-max calibrated with the
    sentinel in it): whatever read the dequantized copy reads the float tensor itself. A graph output is
    named by its DequantizeLinear (onnxruntime renames the tensor feeding its
    QuantizeLinear); it keeps its name. Returns the tensors kept float, sorted."""
    graph, wanted = model.graph, set(names)
    outputs = {o.name for o in graph.output}
    tainted: set[str] = set()  # scales and zero points of the pairs taken out
    kept: set[str] = set()
    while True:
        readers = consumers(graph)
        drop: list[onnx.NodeProto] = []
        for quant in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
            copies = readers.get(quant.output[0], [])
            dequants = [r for r, _ in copies if r.op_type == "DequantizeLinear"]
            if len(dequants) != len(copies):
                continue  # an integer reader (a QLinear op) needs the quantized tensor
            source = quant.input[0]
            names_here = {source} | {d.output[0] for d in dequants} & outputs
            if not names_here & wanted and not (shared and tainted.intersection(quant.input[1:])):
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
            kept.add(source)
        if not drop:
            break
        for node in drop:
            graph.node.remove(node)
        tainted |= {name for node in drop for name in node.input[1:]}
    still_read = {name for node in graph.node for name in node.input}
    unread = [i for i in graph.initializer if i.name in tainted - still_read]
    for initializer in unread:
        graph.initializer.remove(initializer)
    return sorted(kept)


def constant_readers(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's nodes that read a float initializer holding a sentinel
    (a constant causal mask): quantized, it would get an infinite or useless scale.
    Nameless nodes are left out: onnxruntime's quantizer excludes nodes by name."""
    held = {
        i.name
        for i in model.graph.initializer
        if i.data_type in FLOAT_TYPES and sentinels(numpy_helper.to_array(i)) is not None
    }
    return [n.name for n in model.graph.node if n.name and held.intersection(n.input)]


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every mention of tensor ``old`` by a node becomes ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
