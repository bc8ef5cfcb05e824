"""Per-layer fallback: which quantized nodes hurt fidelity most, to keep them in float.

The float model (as it entered the quantizer) and the quantized candidate are both run
with the inputs and outputs of the quantized nodes exposed as outputs. A quantized
node's harm is the relative error of its output minus the worst relative error of its
inputs, so error a node merely inherits from upstream is not blamed on it.

Memory stays bounded however large the model's activations: the exposed tensors are
split into batches whose estimated size (from shape inference on the sample's shapes)
fits ``batch_bytes``, each batch gets its own pair of sessions, and errors accumulate
sample by sample, so at most one sample's batch of tensors from each model is held.
The search runs :func:`rank_files` in a child process (see ``isolation``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.arrayfiles import ArrayFiles
from slimfleet.host.compress.modelfile import with_outputs
from slimfleet.host.compress.tensorsizes import batches, tensor_bytes
from slimfleet.host.passes import Feed

MAX_VARIANTS = 5
"""Fallback variants per candidate: 1, 2, 4, 8, 16 nodes kept in float."""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def quantized_nodes(float_model: onnx.ModelProto, quantized: onnx.ModelProto) -> list[str]:
    """Names of float-model nodes whose weights or op a quantizer (or fp16) changed.

    A node counts when the tensor it produced is now made by another op type
    (``MatMul`` -> ``MatMulInteger`` ... ``Mul``), or by a node that reads a weight
    through ``DequantizeLinear`` (QDQ format) or a weight whose type changed (fp16).
    Activation-only ops between them (Relu, Sigmoid, Mul) are not listed: quantizers
    keep their inputs quantized for the neighbours' sake, so leaving one of them out
    changes nothing. Unnamed nodes cannot be excluded by name and are left out.
    """
    made_by = _producers(quantized.graph)
    weight_types = {t.name: t.data_type for t in float_model.graph.initializer}
    now_types = {t.name: t.data_type for t in quantized.graph.initializer}

    def changed_weight(tensor: str) -> bool:
        if tensor in now_types:
            return tensor in weight_types and now_types[tensor] != weight_types[tensor]
        src = made_by.get(tensor)
        return src is not None and src.op_type == "DequantizeLinear" and src.input[0] in now_types

    names = []
    for node in float_model.graph.node:
        now = made_by.get(node.output[0]) if node.output else None
        if not node.name or now is None:
            continue
        if now.op_type != node.op_type or any(changed_weight(i) for i in now.input):
            names.append(node.name)
    return names


def _relative_error(ref: np.ndarray, got: np.ndarray) -> float | None:
    if ref.shape != got.shape or ref.dtype.kind != "f":
        return None
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(ref64 - got64) / (np.linalg.norm(ref64) + 1e-12))


def tensor_errors(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    tensors: Sequence[str],
    samples: Sequence[Feed],
    *,
    threads: int = 1,
    batch_bytes: int = 256 << 20,
) -> dict[str, float]:
    """Mean relative error (over ``samples``) of each of ``tensors``, quantized vs float.

    Tensors a model lacks, or whose shapes differ, or that are not float, score 0.
    """
    if not samples or not tensors:
        return {}
    sizes = tensor_bytes(float_model, samples[0], tensors)
    # Each run holds the batch from both models: half the limit each.
    groups = batches(sizes, max(1, batch_bytes // 2))
    sums = dict.fromkeys(tensors, 0.0)
    counts = dict.fromkeys(tensors, 0)
    for group in groups:
        reference = open_session(with_outputs(float_model, group).SerializeToString(), threads)
        candidate = open_session(with_outputs(quantized, group).SerializeToString(), threads)
        for feed in samples:  # one sample's batch at a time
            ref = dict(zip(group, reference.run(group, feed), strict=True))
            got = dict(zip(group, candidate.run(group, feed), strict=True))
            for name in group:
                error = _relative_error(ref[name], got[name])
                if error is not None:
                    sums[name] += error
                    counts[name] += 1
            del ref, got
        del reference, candidate
    return {t: sums[t] / counts[t] if counts[t] else 0.0 for t in tensors}


def rank_nodes(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    samples: Sequence[Feed],
    *,
    threads: int = 1,
    batch_bytes: int = 256 << 20,
) -> list[tuple[str, float]]:
    """Quantized nodes with their harm, most harmful first, measured on ``samples``."""
    names = set(quantized_nodes(float_model, quantized))
    if not names:
        return []
    graph = float_model.graph
    weights = {t.name for t in graph.initializer}
    in_quantized = set(_producers(quantized.graph)) | {i.name for i in quantized.graph.input}
    graph_inputs = {i.name for i in graph.input}
    wanted = {
        t
        for node in graph.node
        if node.name in names
        for t in [node.output[0], *node.input]
        if t and t not in weights and t not in graph_inputs and t in in_quantized
    }
    produced = [o for n in graph.node for o in n.output if o in wanted]  # in graph order
    error = tensor_errors(
        float_model, quantized, produced, samples, threads=threads, batch_bytes=batch_bytes
    )
    inherited = _inherited_error(graph, error)
    harm = [
        (node.name, error[node.output[0]] - max((inherited(i) for i in node.input), default=0.0))
        for node in graph.node
        if node.name in names and node.output[0] in error
    ]
    return sorted(harm, key=lambda item: -item[1])


def rank_files(
    float_path: Path, quantized_path: Path, samples: Sequence[Path], threads: int, batch: int
) -> list[tuple[str, float]]:
    """:func:`rank_nodes` on model and sample files (what the search's child process runs)."""
    return rank_nodes(
        onnx.load(str(float_path)),
        onnx.load(str(quantized_path)),
        ArrayFiles(samples),
        threads=threads,
        batch_bytes=batch,
    )


def _inherited_error(graph: onnx.GraphProto, error: dict[str, float]) -> Callable[[str], float]:
    """The error a tensor carries in: its own when measured, else its nearest measured
    ancestors' worst (a tensor the quantizer fused away is looked through)."""
    producers = _producers(graph)
    memo: dict[str, float] = {}

    def inherited(tensor: str) -> float:
        if tensor in error:
            return error[tensor]
        if tensor not in memo:
            memo[tensor] = 0.0  # cycles cannot happen in a valid graph; this guards anyway
            node = producers.get(tensor)
            memo[tensor] = (
                max((inherited(i) for i in node.input if i), default=0.0) if node else 0.0
            )
        return memo[tensor]

    return inherited


def exclusion_sizes(count: int) -> list[int]:
    """How many top-ranked nodes each variant keeps in float: 1, 2, 4, ... below ``count``."""
    sizes, k = [], 1
    while k < count and len(sizes) < MAX_VARIANTS:
        sizes.append(k)
        k *= 2
    return sizes
