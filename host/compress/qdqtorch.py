"""A QDQ ONNX graph run in torch, with onnxruntime's quantization arithmetic, for training.

:class:`QdqGraph` interprets a static-int8 QDQ model (what ``quantize_static`` writes)
node by node: QuantizeLinear / DequantizeLinear become fake quantization that computes
exactly what onnxruntime computes when it runs the QDQ graph without fusing it
(``x / scale``, round half to even, ``+ zero_point``, saturate; ``(q - zero_point) *
scale`` in float32), with straight-through gradients for the rounding. What it trains:

* every 8-bit weight behind a DequantizeLinear, as a float parameter in units of its
  initial quantization step (so one learning rate fits every tensor), starting from the
  float model's weight when given, else from the dequantized one; int8 weights stay in
  [-127, 127] (onnxruntime's symmetric range), uint8 in [0, 255];
* every int32 bias behind a DequantizeLinear; its scale is recomputed as input scale x
  weight scale, as onnxruntime's quantizer defines it;
* optionally (``learn_scales``) every scale, LSQ-style, as ``scale0 * exp(t)``.

:meth:`QdqGraph.write_back` writes the trained integers and scales into a copy of the
model, so onnxruntime then computes what the last forward pass computed. Operators
outside :data:`OPS` are refused up front (:func:`unsupported`). Memory: the forward
pass keeps the activations of one batch for the backward pass, as torch does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

INT_RANGES = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT16: (-32768, 32767),
}
WEIGHT_RANGES = {onnx.TensorProto.INT8: (-127, 127), onnx.TensorProto.UINT8: (0, 255)}
BIAS_UNIT = 128.0
"""A bias is trained in units of 128 of its int32 steps (input scale x weight scale):
about one step of the layer's output, so the weights' learning rate suits it too."""
QUANT_SUFFIX = "_quantized"
"""onnxruntime's quantizer names a quantized initializer ``<float name>_quantized``."""


class _RoundSTE(torch.autograd.Function):
    """torch.round (half to even, like onnxruntime) with a straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, low: int, high: int
) -> torch.Tensor:
    """onnxruntime's QuantizeLinear as floats holding integers (saturated)."""
    return torch.clamp(_RoundSTE.apply(x / scale) + zero, low, high)


def _axis_shape(scale: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    if scale.dim() == 0 or (scale.numel() == 1 and rank == 0):
        return scale
    shape = [1] * rank
    shape[axis % rank] = -1
    return scale.reshape(shape)


def unsupported(model: onnx.ModelProto) -> list[str]:
    """Op types of ``model``'s main graph the interpreter cannot run (sorted)."""
    return sorted(
        {
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            for n in model.graph.node
            if n.op_type not in OPS or n.domain not in ("", "ai.onnx")
        }
    )


class QdqGraph(torch.nn.Module):
    """The trainable torch twin of a QDQ model (see the module docstring)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        float_weights: Mapping[str, np.ndarray] | None = None,
        learn_scales: bool = False,
    ) -> None:
        super().__init__()
        missing = unsupported(model)
        if missing:
            raise ValueError(f"operator {missing[0]} is not supported by the QAT interpreter")
        self.model = model
        self.nodes = list(model.graph.node)
        self.outputs = [o.name for o in model.graph.output]
        self.inputs = [i.name for i in model.graph.input]
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.types = {t.name: t.data_type for t in model.graph.initializer}
        self.consts = {name: _tensor(a) for name, a in self.inits.items()}
        self.dq_of = {n.input[0]: n for n in self.nodes if n.op_type == "DequantizeLinear"}
        """The DequantizeLinear reading each initializer."""
        self.learn_scales = learn_scales
        self.units = torch.nn.ParameterDict()
        """Trained weights and biases, by initializer name, in units of ``self.steps``."""
        self.steps: dict[str, torch.Tensor] = {}
        self.logs = torch.nn.ParameterDict()
        """log(scale / initial scale) by scale initializer name (with ``learn_scales``)."""
        self.bias_of: dict[str, tuple[str, str]] = {}
        """int32 bias initializer -> (input scale name, weight scale name)."""
        float_weights = float_weights or {}
        producers = {o: n for n in self.nodes for o in n.output}
        for node in self.nodes:
            if node.op_type == "DequantizeLinear" and node.input[0] in self.inits:
                self._trainable(node, producers, float_weights)
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and learn_scales:
                self._learnable_scale(node.input[1])

    def _key(self, name: str) -> str:
        return name.replace(".", "\u00b7")  # ParameterDict keys may not hold dots

    def _learnable_scale(self, name: str) -> None:
        if name in self.inits and self._key(name) not in self.logs:
            self.logs[self._key(name)] = torch.nn.Parameter(
                torch.zeros(self.inits[name].shape, dtype=torch.float32)
            )

    def _trainable(
        self,
        node: onnx.NodeProto,
        producers: dict[str, onnx.NodeProto],
        float_weights: Mapping[str, np.ndarray],
    ) -> None:
        name, scale_name = node.input[0], node.input[1]
        kind = self.types[name]
        if kind == onnx.TensorProto.INT32:
            found = self._bias_sources(node, producers)
            if found is None:
                return
            self.bias_of[name] = found
            step = torch.from_numpy(self.inits[scale_name].astype(np.float32)) * BIAS_UNIT
        elif kind in WEIGHT_RANGES:
            step = torch.from_numpy(self.inits[scale_name].astype(np.float32))
        else:
            return
        axis = _attr(node, "axis", 1)
        rank = self.inits[name].ndim
        step = _axis_shape(step, rank, axis)
        zero = self._zero_point(node)
        start = float_weights.get(name.removesuffix(QUANT_SUFFIX))
        if start is None or start.shape != self.inits[name].shape:
            start_t = (torch.from_numpy(self.inits[name].astype(np.float32)) - zero) * (
                step / (BIAS_UNIT if kind == onnx.TensorProto.INT32 else 1.0)
            )
        else:
            start_t = torch.from_numpy(start.astype(np.float32))
        self.steps[name] = step
        self.units[self._key(name)] = torch.nn.Parameter(start_t / step)

    def _bias_sources(
        self, node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]
    ) -> tuple[str, str] | None:
        """(input scale, weight scale) of the Conv/Gemm whose bias ``node`` dequantizes."""
        for user in self.nodes:
            if user.op_type in ("Conv", "Gemm") and len(user.input) > 2:
                if user.input[2] != node.output[0]:
                    continue
                x, w = producers.get(user.input[0]), producers.get(user.input[1])
                if x is None or w is None:
                    return None
                if x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear":
                    return None
                expected = self.inits[x.input[1]] * self.inits[w.input[1]]
                if not np.array_equal(expected.reshape(-1), self.inits[node.input[1]].reshape(-1)):
                    return None  # a bias scale of its own: left as onnxruntime chose it
                return x.input[1], w.input[1]
        return None

    def _zero_point(self, node: onnx.NodeProto) -> torch.Tensor:
        if len(node.input) < 3 or not node.input[2]:
            return torch.zeros(())
        zero = torch.from_numpy(self.inits[node.input[2]].astype(np.float32))
        rank = self.inits[node.input[0]].ndim if node.input[0] in self.inits else 0
        return _axis_shape(zero, rank, _attr(node, "axis", 1))

    # -- values -------------------------------------------------------------------------

    def scale(self, name: str) -> torch.Tensor:
        """The current value of scale initializer ``name`` (float32)."""
        base = self.consts[name].float()
        log = self.logs.get(self._key(name))
        return base if log is None else base * torch.exp(log)

    def weight_range(self, name: str) -> tuple[int, int]:
        return WEIGHT_RANGES.get(self.types[name], (-(2**31), 2**31 - 1))

    def integers(self, name: str) -> torch.Tensor:
        """Trained initializer ``name`` quantized with the current scales (no zero point)."""
        value = self.units[self._key(name)] * self.steps[name]
        if name in self.bias_of:
            x_scale, w_scale = self.bias_of[name]
            scale = self.scale(x_scale) * self.scale(w_scale)
            return _RoundSTE.apply(value / _axis_shape(scale, value.dim(), 0))
        node = self.dq_of[name]
        zero = self._zero_point(node)
        scale = _axis_shape(self.scale(node.input[1]), value.dim(), _attr(node, "axis", 1))
        low, high = self.weight_range(name)
        return fake_quant(value, scale, zero, low, high) - zero

    # -- running ------------------------------------------------------------------------

    def forward(self, feed: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        values: dict[str, Any] = dict(feed)
        for node in self.nodes:
            args = [self._value(name, values) if name else None for name in node.input]
            if node.op_type == "DequantizeLinear" and node.input[0] in self.steps:
                out: Any = self._dequantize_trained(node)
            elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                out = self._qdq(node, args)
            else:
                out = OPS[node.op_type](node, *args)
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(node.output, outs, strict=False):
                if name:
                    values[name] = value
        return [values[name] for name in self.outputs]

    def _value(self, name: str, values: dict[str, Any]) -> Any:
        if name in values:
            return values[name]
        if name in self.consts:
            return self.consts[name]
        raise KeyError(f"tensor {name!r} is neither computed nor an initializer")

    def _dequantize_trained(self, node: onnx.NodeProto) -> torch.Tensor:
        name = node.input[0]
        integers = self.integers(name)
        if name in self.bias_of:
            x_scale, w_scale = self.bias_of[name]
            scale = self.scale(x_scale) * self.scale(w_scale)
            return integers * _axis_shape(scale, integers.dim(), 0)
        return integers * _axis_shape(
            self.scale(node.input[1]), integers.dim(), _attr(node, "axis", 1)
        )

    def _qdq(self, node: onnx.NodeProto, args: list[Any]) -> Any:
        x = args[0]
        scale = self.scale(node.input[1]) if node.input[1] in self.consts else args[1].float()
        zero_name = node.input[2] if len(node.input) > 2 else ""
        zero = self.consts[zero_name].float() if zero_name else torch.zeros(())
        rank = x.dim()
        axis = _attr(node, "axis", 1)
        scale, zero = _axis_shape(scale, rank, axis), _axis_shape(zero, rank, axis)
        if node.op_type == "QuantizeLinear":
            kind = self.types.get(zero_name, onnx.TensorProto.UINT8)
            low, high = INT_RANGES[kind]
            return fake_quant(x, scale, zero, low, high)
        return (x.float() - zero) * scale

    def write_back(self) -> onnx.ModelProto:
        """A copy of the model with the trained integers and scales as its initializers."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        with torch.no_grad():
            new: dict[str, np.ndarray] = {}
            for key in self.units:
                name = key.replace("\u00b7", ".")
                node = self.dq_of[name]
                zero = self._zero_point(node)
                new[name] = (self.integers(name) + zero).numpy().astype(self.inits[name].dtype)
                if name in self.bias_of:
                    x_scale, w_scale = self.bias_of[name]
                    new[node.input[1]] = (self.scale(x_scale) * self.scale(w_scale)).numpy()
            for key in self.logs:
                name = key.replace("\u00b7", ".")
                new.setdefault(name, self.scale(name).numpy())
        for tensor in out.graph.initializer:
            if tensor.name in new:
                value = new[tensor.name].astype(self.inits[tensor.name].dtype)
                tensor.CopyFrom(
                    numpy_helper.from_array(
                        value.reshape(self.inits[tensor.name].shape), tensor.name
                    )
                )
        return out


# -- operators ------------------------------------------------------------------------------


def _tensor(array: np.ndarray) -> torch.Tensor:
    """An initializer as torch uses it here: floats as float32, integers as int64."""
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(array.astype(np.int64))


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _pads(
    node: onnx.NodeProto, x: torch.Tensor, kernel: list[int], strides: list[int], dil: list[int]
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...], with auto_pad resolved."""
    spatial = x.shape[2:]
    auto = _attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dil, strict=True):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * len(spatial))
    return list(_attr(node, "pads", [0] * (2 * len(spatial))))


def _padded(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    n = len(pads) // 2
    torch_pads: list[int] = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    return F.pad(x, torch_pads, value=value) if any(torch_pads) else x


def _conv(
    node: onnx.NodeProto, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
) -> torch.Tensor:
    n = w.dim() - 2
    strides = list(_attr(node, "strides", [1] * n))
    dil = list(_attr(node, "dilations", [1] * n))
    x = _padded(x, _pads(node, x, list(w.shape[2:]), strides, dil))
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(x, w, b, strides, 0, dil, _attr(node, "group", 1))


def _pool(node: onnx.NodeProto, x: torch.Tensor) -> torch.Tensor:
    kernel = list(_attr(node, "kernel_shape"))
    n = len(kernel)
    strides = list(_attr(node, "strides", [1] * n))
    dil = list(_attr(node, "dilations", [1] * n))
    pads = _pads(node, x, kernel, strides, dil)
    ceil = bool(_attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        x = _padded(x, pads, float("-inf"))
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        return pool(x, kernel, strides, 0, dil, ceil_mode=ceil)
    include = bool(_attr(node, "count_include_pad", 0))
    if include or not any(pads):
        x = _padded(x, pads)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        return pool(x, kernel, strides, 0, ceil_mode=ceil)
    ones = torch.ones_like(x[:1, :1])
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    total = pool(_padded(x, pads), kernel, strides, 0, ceil_mode=ceil)
    count = pool(_padded(ones, pads), kernel, strides, 0, ceil_mode=ceil)
    return total / count


def _gemm(
    node: onnx.NodeProto, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None
) -> torch.Tensor:
    a = a.t() if _attr(node, "transA", 0) else a
    b = b.t() if _attr(node, "transB", 0) else b
    y = _attr(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + _attr(node, "beta", 1.0) * c


def _lstm(
    node: onnx.NodeProto, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, *rest: Any
) -> tuple[torch.Tensor, ...]:
    """ONNX LSTM (gates i, o, f, c; sigmoid/tanh/tanh; layout 0), forward/reverse/bidirectional."""
    b, lengths, h0, c0 = (list(rest) + [None] * 4)[:4]
    if len(rest) > 4 and rest[4] is not None:
        raise ValueError("LSTM peepholes are not supported by the QAT interpreter")
    if lengths is not None and bool((lengths != x.shape[0]).any()):
        raise ValueError("LSTM sequence_lens shorter than the sequence are not supported")
    hidden = _attr(node, "hidden_size")
    dirs, steps, batch = w.shape[0], x.shape[0], x.shape[1]
    direction = _attr(node, "direction", "forward")
    ys, hs, cs = [], [], []
    for d in range(dirs):
        bias = b[d, : 4 * hidden] + b[d, 4 * hidden :] if b is not None else 0
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        projected = x @ w[d].t() + bias
        out = [None] * steps
        for t in reversed(range(steps)) if reverse else range(steps):
            gates = projected[t] + h @ r[d].t()
            i, o, f, g = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)


def _reshape(node: onnx.NodeProto, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = _ints(shape)
    if not _attr(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(node: onnx.NodeProto, given: torch.Tensor | None) -> list[int]:
    return _ints(given) if given is not None else list(_attr(node, "axes", []))


def _unsqueeze(
    node: onnx.NodeProto, x: torch.Tensor, axes: torch.Tensor | None = None
) -> torch.Tensor:
    rank = x.dim() + len(_axes(node, axes))
    for axis in sorted(a % rank for a in _axes(node, axes)):
        x = x.unsqueeze(axis)
    return x


def _squeeze(
    node: onnx.NodeProto, x: torch.Tensor, axes: torch.Tensor | None = None
) -> torch.Tensor:
    chosen = _axes(node, axes) or [i for i, s in enumerate(x.shape) if s == 1]
    for axis in sorted((a % x.dim() for a in chosen), reverse=True):
        x = x.squeeze(axis)
    return x


def _gather(node: onnx.NodeProto, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = _attr(node, "axis", 0) % x.dim()
    flat = idx.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    picked = torch.index_select(x, axis, flat)
    return picked.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _slice(
    node: onnx.NodeProto,
    x: torch.Tensor,
    starts: Any = None,
    ends: Any = None,
    axes: Any = None,
    steps: Any = None,
) -> torch.Tensor:
    s = _ints(starts) if starts is not None else list(_attr(node, "starts"))
    e = _ints(ends) if ends is not None else list(_attr(node, "ends"))
    a = _ints(axes) if axes is not None else list(_attr(node, "axes", range(len(s))))
    st = _ints(steps) if steps is not None else [1] * len(s)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(s, e, a, st, strict=True):
        if step < 0:
            raise ValueError("Slice with a negative step is not supported by the QAT interpreter")
        size = x.shape[axis]
        index[axis] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
    return x[tuple(index)]


def _constant(node: onnx.NodeProto) -> torch.Tensor:
    value = _attr(node, "value")
    if isinstance(value, onnx.TensorProto):
        return _tensor(numpy_helper.to_array(value))
    for name in ("value_float", "value_int"):
        if _attr(node, name) is not None:
            return torch.tensor(_attr(node, name))
    for name in ("value_floats", "value_ints"):
        if _attr(node, name) is not None:
            return torch.tensor(list(_attr(node, name)))
    raise ValueError(f"Constant {node.name!r}: unsupported value kind")


def _constant_of_shape(node: onnx.NodeProto, shape: torch.Tensor) -> torch.Tensor:
    value = _attr(node, "value")
    fill = _tensor(numpy_helper.to_array(value)) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(_ints(shape)).clone()


def _clip(node: onnx.NodeProto, x: torch.Tensor, low: Any = None, high: Any = None) -> torch.Tensor:
    low = float(low) if low is not None else _attr(node, "min")
    high = float(high) if high is not None else _attr(node, "max")
    return torch.clamp(x, low, high)


def _batchnorm(
    node: onnx.NodeProto,
    x: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2)
    eps = _attr(node, "epsilon", 1e-5)
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * g.reshape(
        shape
    ) + b.reshape(shape)


def _cast(node: onnx.NodeProto, x: torch.Tensor) -> torch.Tensor:
    kind = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
    if kind == np.float32:
        return x.float()
    if np.issubdtype(kind, np.integer):
        return x.long() if not x.is_floating_point() else torch.trunc(x).long()
    if kind == np.bool_:
        return x != 0
    raise ValueError(f"Cast to {kind} is not supported by the QAT interpreter")


def _reduce_mean(
    node: onnx.NodeProto, x: torch.Tensor, axes: torch.Tensor | None = None
) -> torch.Tensor:
    dims = _axes(node, axes) or list(range(x.dim()))
    return x.mean(dim=dims, keepdim=bool(_attr(node, "keepdims", 1)))


def _softmax(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return lambda node, x: fn(x, dim=_attr(node, "axis", -1))


def _split(
    node: onnx.NodeProto, x: torch.Tensor, sizes: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    axis = _attr(node, "axis", 0)
    parts = _ints(sizes) if sizes is not None else list(_attr(node, "split", []))
    if not parts:
        count = len(node.output)
        parts = [x.shape[axis] // count] * count
    return tuple(torch.split(x, parts, dim=axis))


OPS: dict[str, Callable[..., Any]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: a @ b,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Div": lambda n, a, b: (
        a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")
    ),
    "Pow": lambda n, a, b: torch.pow(a, b),
    "Sqrt": lambda n, x: torch.sqrt(x),
    "Exp": lambda n, x: torch.exp(x),
    "Neg": lambda n, x: -x,
    "Abs": lambda n, x: torch.abs(x),
    "Erf": lambda n, x: torch.erf(x),
    "Relu": lambda n, x: F.relu(x),
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Tanh": lambda n, x: torch.tanh(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, _attr(n, "alpha", 0.01)),
    "HardSigmoid": lambda n, x: torch.clamp(
        _attr(n, "alpha", 0.2) * x + _attr(n, "beta", 0.5), 0, 1
    ),
    "HardSwish": lambda n, x: x * torch.clamp(x / 6 + 0.5, 0, 1),
    "Clip": _clip,
    "BatchNormalization": _batchnorm,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "ReduceMean": _reduce_mean,
    "LSTM": _lstm,
    "Reshape": _reshape,
    "Flatten": lambda n, x: x.reshape(
        math.prod(x.shape[: _attr(n, "axis", 1) % (x.dim() + 1)]), -1
    ),
    "Transpose": lambda n, x: x.permute(*_attr(n, "perm", list(reversed(range(x.dim()))))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda n, *xs: torch.cat([x for x in xs if x is not None], dim=_attr(n, "axis")),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": lambda n, x: torch.tensor(list(x.shape), dtype=torch.int64),
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Expand": lambda n, x, shape: x * torch.ones(_ints(shape), dtype=x.dtype),
    "Cast": _cast,
    "Identity": lambda n, x: x,
    "QuantizeLinear": lambda n, *a: None,  # run by QdqGraph._qdq (needs the scales)
    "DequantizeLinear": lambda n, *a: None,
}
"""What the interpreter runs (ai.onnx domain); anything else is refused before training."""
