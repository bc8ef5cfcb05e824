"""The weight matrices of MatMul, Gemm and LSTM layers, and where their inputs come from.

What passes that reshape weights from calibration data (``gptq``, ``smoothquant``) share:
which initializer holds each layer's weights, which rows (output channel x input) of it
one matrix is, the tensor whose values are that matrix's inputs (an LSTM's recurrent
weights read the previous hidden states, taken from its output ``Y``), and reading those
tensors on a calibration sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from slimfleet.host.passes import Feed
from slimfleet.plugins.onnxgraph import float_attr
from slimfleet.plugins.prune import int_attr


@dataclass(frozen=True)
class Weight:
    """One weight matrix and where its inputs come from.

    Its rows (output channel x input) are ``tensor`` itself, its transpose
    (``transposed``: MatMul's [K, N], Gemm's B without transB), or slice ``direction``
    of an LSTM's [D, 4H, K] W or R.
    """

    node: str
    op_type: str
    tensor: str
    source: str
    """The tensor whose values are this weight's inputs; for R, an :class:`LstmState` key."""
    transposed: bool = False
    direction: int | None = None
    bias: tuple[str, int, int] | None = None
    """The bias initializer and the [start, stop) of it (flattened) these outputs add to."""

    def rows(self, array: np.ndarray) -> np.ndarray:
        if self.direction is not None:
            return array[self.direction]
        return array.T if self.transposed else array

    def write(self, array: np.ndarray, rows: np.ndarray) -> None:
        if self.direction is not None:
            array[self.direction] = rows
        elif self.transposed:
            array[...] = rows.T
        else:
            array[...] = rows


@dataclass(frozen=True)
class LstmState:
    """Where an LSTM's previous hidden states come from: output ``y`` of ``node``."""

    y: str
    direction: int
    reverse: bool
    layout: int

    @property
    def key(self) -> str:
        return f"{self.y}#h{self.direction}"

    def previous(self, y: np.ndarray) -> np.ndarray:
        """[steps*batch, H] hidden states each step starts from (zeros before the first)."""
        if self.layout:  # [B, T, D, H] -> [T, D, B, H]
            y = y.transpose(1, 2, 0, 3)
        states = y[:, self.direction]
        zeros = np.zeros_like(states[:1])
        moved = (states[1:], zeros) if self.reverse else (zeros, states[:-1])
        return np.concatenate(moved).reshape(-1, states.shape[-1])


def layer_weights(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto]
) -> tuple[list[Weight], dict[str, LstmState]]:
    """The float32 weight matrices of ``nodes`` held in initializers and read by data
    (others are left out), and the LSTM hidden states some of them read, by key."""
    inits = {t.name: t for t in model.graph.initializer}
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}

    def weight(name: str, rank: int) -> bool:
        tensor = inits.get(name)
        return (
            tensor is not None
            and tensor.data_type == onnx.TensorProto.FLOAT
            and (len(tensor.dims) == rank)
        )

    weights: list[Weight] = []
    states: dict[str, LstmState] = {}
    for node in nodes:
        if node.input[0] not in produced or node.input[0] in inits:
            continue  # its input is a constant: nothing to learn from data
        key = node.name or node.output[0]
        if node.op_type == "MatMul" and weight(node.input[1], 2):
            weights.append(Weight(key, "MatMul", node.input[1], node.input[0], transposed=True))
        elif node.op_type == "Gemm" and weight(node.input[1], 2):
            if int_attr(node, "transA", 0) or float_attr(node, "alpha", 1.0) != 1.0:
                continue
            transposed = not int_attr(node, "transB", 0)
            width = inits[node.input[1]].dims[1 if transposed else 0]
            bias = None
            has_c = len(node.input) > 2 and _bias(inits.get(node.input[2]), width)
            if has_c and float_attr(node, "beta", 1.0) == 1.0:
                bias = (node.input[2], 0, width)
            weights.append(
                Weight(key, "Gemm", node.input[1], node.input[0], transposed, None, bias)
            )
        elif node.op_type == "LSTM" and weight(node.input[1], 3) and weight(node.input[2], 3):
            found, found_states = _lstm(key, node, inits)
            weights += found
            states.update(found_states)
    return weights, states


def _lstm(
    key: str, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
) -> tuple[list[Weight], dict[str, LstmState]]:
    """W and R of each direction; W reads X, R the previous hidden state (from Y)."""
    directions, gates = inits[node.input[1]].dims[:2]
    bias_name = node.input[3] if len(node.input) > 3 else ""
    has_bias = _bias(inits.get(bias_name), directions * 2 * gates)
    reverse = any(a.name == "direction" and a.s == b"reverse" for a in node.attribute)
    layout = int_attr(node, "layout", 0)
    weights, states = [], {}
    y = node.output[0] if node.output else ""
    for d in range(directions):
        state = LstmState(y, d, reverse or d == 1, layout)
        sources = [(node.input[1], node.input[0])]
        if y:  # else (check() on an unnamed Y) only W counts
            states[state.key] = state
            sources.append((node.input[2], state.key))
        for k, (tensor, source) in enumerate(sources):
            start = (2 * d + k) * gates
            bias = (bias_name, start, start + gates) if has_bias else None
            weights.append(Weight(key, "LSTM", tensor, source, direction=d, bias=bias))
    return weights, states


def name_lstm_outputs(model: onnx.ModelProto) -> None:
    """Give every LSTM's unused output Y a name, so its hidden states can be read."""
    for node in model.graph.node:
        if node.op_type == "LSTM" and not (node.output and node.output[0]):
            name = f"{node.name or node.input[0]}__Y"
            if node.output:
                node.output[0] = name
            else:
                node.output.append(name)


def _bias(tensor: onnx.TensorProto | None, size: int) -> bool:
    if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
        return False
    return int(np.prod(tensor.dims)) == size


def width(weight: Weight, inits: dict[str, onnx.TensorProto]) -> int:
    """The number of inputs of ``weight`` (the size of its Hessian's side)."""
    dims = inits[weight.tensor].dims
    if weight.direction is not None:
        return dims[2]
    return dims[0] if weight.transposed else dims[1]


def fetch(session: ort.InferenceSession, names: list[str], feed: Feed) -> list[np.ndarray]:
    """The values of ``names`` on ``feed``: outputs of ``session`` or inputs in ``feed``."""
    outputs = {o.name for o in session.get_outputs()}
    fetched = [n for n in names if n in outputs]
    values = dict(zip(fetched, session.run(fetched, feed), strict=True)) if fetched else {}
    return [values[n] if n in values else np.asarray(feed[n]) for n in names]
