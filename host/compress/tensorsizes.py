"""How many bytes a model's tensors take on given inputs, and batching them under a limit.

Used to plan what may be held at once: the fallback's intermediate outputs, and how
many calibration samples a quantizer collects before it reduces them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

Feed = Mapping[str, np.ndarray]


def tensor_bytes(model: onnx.ModelProto, feed: Feed, tensors: Sequence[str]) -> dict[str, int]:
    """Estimated bytes of each of ``tensors`` when ``model`` runs on ``feed``.

    Shape inference runs with the inputs fixed to the feed's shapes; a tensor whose size
    it cannot tell is assumed as large as the largest one it can (or the largest input).
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        if value.name in feed and value.type.HasField("tensor_type"):
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in np.shape(feed[value.name]):
                shape.dim.add().dim_value = int(size)
    known: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
        values = [*inferred.graph.value_info, *inferred.graph.output]
    except Exception:  # shape inference gives up on some real models: assume the worst
        values = []
    for value in values:
        kind = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in kind.shape.dim]
        if kind.HasField("shape") and all(dims) and kind.elem_type:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).itemsize
            known[value.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    default = max([*known.values(), *(np.asarray(a).nbytes for a in feed.values()), 1])
    return {t: known.get(t, default) for t in tensors}


def batches(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """``sizes``' names in order, grouped so each group's total stays within ``limit``
    (a single tensor larger than the limit is a group of its own)."""
    groups: list[list[str]] = []
    total = 0
    for name, size in sizes.items():
        if not groups or total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def activation_bytes(model: onnx.ModelProto, feed: Feed) -> int:
    """Estimated bytes of every node output of ``model`` on ``feed`` (one sample)."""
    outputs = [o for node in model.graph.node for o in node.output if o]
    return sum(tensor_bytes(model, feed, outputs).values())
