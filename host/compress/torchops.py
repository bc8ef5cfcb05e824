"""ONNX operators in torch, for the QAT interpreter (:mod:`.qdqtorch`).

:data:`OPS` maps an ai.onnx op type to ``fn(node, *inputs)`` returning a tensor or a
tuple of tensors; absent inputs are None. Forms these functions cannot run exactly
(LSTM peepholes or short sequences, Cast to other types) raise
ValueError with one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def tensor_of(array: np.ndarray) -> torch.Tensor:
    """An initializer as torch uses it here: floats as float32, integers as int64."""
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(array.astype(np.int64))


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
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
    auto = attr(node, "auto_pad", "NOTSET")
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
    return list(attr(node, "pads", [0] * (2 * len(spatial))))


def _torch_pads(pads: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] of the last n dims in F.pad's order (last
    dim first, each as begin, end)."""
    n = len(pads) // 2
    torch_pads: list[int] = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    return torch_pads


def _padded(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    torch_pads = _torch_pads(pads)
    return F.pad(x, torch_pads, value=value) if any(torch_pads) else x


def _conv(
    node: onnx.NodeProto, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None
) -> torch.Tensor:
    n = w.dim() - 2
    strides = list(attr(node, "strides", [1] * n))
    dil = list(attr(node, "dilations", [1] * n))
    x = _padded(x, _pads(node, x, list(w.shape[2:]), strides, dil))
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return conv(x, w, b, strides, 0, dil, attr(node, "group", 1))


def _pool(node: onnx.NodeProto, x: torch.Tensor) -> torch.Tensor:
    kernel = list(attr(node, "kernel_shape"))
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dil = list(attr(node, "dilations", [1] * n))
    pads = _pads(node, x, kernel, strides, dil)
    ceil = bool(attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        x = _padded(x, pads, float("-inf"))
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        return pool(x, kernel, strides, 0, dil, ceil_mode=ceil)
    include = bool(attr(node, "count_include_pad", 0))
    if include or not any(pads):
        x = _padded(x, pads)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        return pool(x, kernel, strides, 0, ceil_mode=ceil)
    ones = torch.ones_like(x[:1, :1])
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    total = pool(_padded(x, pads), kernel, strides, 0, ceil_mode=ceil)
    count = pool(_padded(ones, pads), kernel, strides, 0, ceil_mode=ceil)
    return total / count


_RESIZE_MODES = {
    ("linear", "half_pixel"): False,
    ("linear", "pytorch_half_pixel"): False,
    ("linear", "align_corners"): True,
    ("nearest", "asymmetric"): None,
}
"""(mode, coordinate_transformation_mode) -> F.interpolate's align_corners (None: nearest)
for the Resize forms torch computes the same way."""


def _resize(
    node: onnx.NodeProto,
    x: torch.Tensor,
    roi: Any = None,
    scales: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """ONNX Resize of the spatial dims of an [N, C, ...] tensor (opset 10's inputs are
    ``x, scales``): bilinear/trilinear with half_pixel, pytorch_half_pixel or
    align_corners coordinates, and nearest with asymmetric coordinates rounding down
    (what ``torch.nn.Upsample`` exports). Other forms are refused by name."""
    mode = attr(node, "mode", "nearest")
    if len(node.input) == 2:  # opset 10: Resize(X, scales), asymmetric coordinates, floor
        scales, roi = roi, None
        coordinates, rounding = "asymmetric", "floor"
    else:
        coordinates = attr(node, "coordinate_transformation_mode", "half_pixel")
        rounding = attr(node, "nearest_mode", "round_prefer_floor")
    key = (mode, coordinates)
    if key not in _RESIZE_MODES or (mode == "nearest" and rounding != "floor"):
        raise ValueError(
            f"Resize mode={mode} coordinate_transformation_mode={coordinates}"
            f"{f' nearest_mode={rounding}' if mode == 'nearest' else ''} is not supported"
        )
    if attr(node, "antialias", 0) or attr(node, "axes", None) is not None:
        raise ValueError("Resize with antialias or axes is not supported")
    if attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ValueError("Resize with a keep_aspect_ratio_policy is not supported")
    dims = x.dim() - 2
    if sizes is not None and sizes.numel():
        size, factor = _ints(sizes), None
        if size[:2] != list(x.shape[:2]):
            raise ValueError("Resize of the batch or channel dims is not supported")
        size = size[2:]
    elif scales is not None and scales.numel():
        values = [float(v) for v in scales.tolist()]
        if values[:2] != [1.0, 1.0]:
            raise ValueError("Resize of the batch or channel dims is not supported")
        size, factor = None, values[2:]
    else:
        raise ValueError("Resize needs scales or sizes")
    if mode == "nearest":
        return F.interpolate(x, size=size, scale_factor=factor, mode="nearest")
    if coordinates == "pytorch_half_pixel" and size is not None and 1 in size:
        raise ValueError("Resize to a length of 1 with pytorch_half_pixel is not supported")
    interpolation = ("linear", "bilinear", "trilinear")[dims - 1]
    return F.interpolate(
        x,
        size=size,
        scale_factor=factor,
        mode=interpolation,
        align_corners=_RESIZE_MODES[key],
        recompute_scale_factor=False if factor is not None else None,
    )


def _gemm(
    node: onnx.NodeProto, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None
) -> torch.Tensor:
    a = a.t() if attr(node, "transA", 0) else a
    b = b.t() if attr(node, "transB", 0) else b
    y = attr(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + attr(node, "beta", 1.0) * c


def _lstm(
    node: onnx.NodeProto, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, *rest: Any
) -> tuple[torch.Tensor, ...]:
    """ONNX LSTM (gates i, o, f, c; sigmoid/tanh/tanh; layout 0), forward/reverse/bidirectional."""
    b, lengths, h0, c0 = (list(rest) + [None] * 4)[:4]
    if len(rest) > 4 and rest[4] is not None:
        raise ValueError("LSTM peepholes are not supported by the QAT interpreter")
    if lengths is not None and bool((lengths != x.shape[0]).any()):
        raise ValueError("LSTM sequence_lens shorter than the sequence are not supported")
    hidden = attr(node, "hidden_size")
    dirs, steps, batch = w.shape[0], x.shape[0], x.shape[1]
    direction = attr(node, "direction", "forward")
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
    if not attr(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(node: onnx.NodeProto, given: torch.Tensor | None) -> list[int]:
    return _ints(given) if given is not None else list(attr(node, "axes", []))


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
    axis = attr(node, "axis", 0) % x.dim()
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
    s = _ints(starts) if starts is not None else list(attr(node, "starts"))
    e = _ints(ends) if ends is not None else list(attr(node, "ends"))
    a = _ints(axes) if axes is not None else list(attr(node, "axes", range(len(s))))
    st = _ints(steps) if steps is not None else [1] * len(s)
    for start, end, axis, step in zip(s, e, a, st, strict=True):
        dim = axis % x.dim()
        picked = _slice_range(start, end, step, x.shape[dim])
        if step > 0:
            index = [slice(None)] * x.dim()
            index[dim] = slice(picked.start, picked.stop, step)
            x = x[tuple(index)]
        else:
            x = torch.index_select(x, dim, torch.tensor(list(picked), dtype=torch.long))
    return x


def _slice_range(start: int, end: int, step: int, size: int) -> range:
    """The indices ONNX's Slice takes along one axis (negative starts and ends count from
    the end; both are clamped, to ``[0, size]`` for a positive step and to ``[-1, size - 1]``
    for a negative one)."""
    if step == 0:
        raise ValueError("Slice with a step of 0")
    start, end = (v + size if v < 0 else v for v in (start, end))
    low, high = (0, size) if step > 0 else (-1, size - 1)
    start = min(max(start, 0), size if step > 0 else size - 1)
    return range(start, min(max(end, low), high), step)


def _constant(node: onnx.NodeProto) -> torch.Tensor:
    value = attr(node, "value")
    if isinstance(value, onnx.TensorProto):
        return tensor_of(numpy_helper.to_array(value))
    for name in ("value_float", "value_int"):
        if attr(node, name) is not None:
            return torch.tensor(attr(node, name))
    for name in ("value_floats", "value_ints"):
        if attr(node, name) is not None:
            return torch.tensor(list(attr(node, name)))
    raise ValueError(f"Constant {node.name!r}: unsupported value kind")


def _constant_of_shape(node: onnx.NodeProto, shape: torch.Tensor) -> torch.Tensor:
    value = attr(node, "value")
    fill = tensor_of(numpy_helper.to_array(value)) if value is not None else torch.zeros(1)
    return fill.reshape(()).expand(_ints(shape)).clone()


def _clip(node: onnx.NodeProto, x: torch.Tensor, low: Any = None, high: Any = None) -> torch.Tensor:
    low = float(low) if low is not None else attr(node, "min")
    high = float(high) if high is not None else attr(node, "max")
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
    eps = attr(node, "epsilon", 1e-5)
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * g.reshape(
        shape
    ) + b.reshape(shape)


def _cast(node: onnx.NodeProto, x: torch.Tensor) -> torch.Tensor:
    kind = onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to"))
    if kind == np.float32:
        return x.float()
    if np.issubdtype(kind, np.integer):
        return x.long() if not x.is_floating_point() else torch.trunc(x).long()
    if kind == np.bool_:
        return x != 0
    raise ValueError(f"Cast to {kind} is not supported by the QAT interpreter")


def _reduce(
    fn: Callable[..., torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """ReduceMean/ReduceSum/ReduceMax: axes from the input (opset 13/18) or the attribute; none
    given reduces every axis unless ``noop_with_empty_axes``."""

    def reduce(node: onnx.NodeProto, x: torch.Tensor, axes: Any = None) -> torch.Tensor:
        dims = _axes(node, axes)
        if not dims and attr(node, "noop_with_empty_axes", 0):
            return x
        return fn(x, dim=dims or list(range(x.dim())), keepdim=bool(attr(node, "keepdims", 1)))

    return reduce


def _layer_norm(
    node: onnx.NodeProto, x: torch.Tensor, scale: torch.Tensor, bias: Any = None
) -> torch.Tensor:
    """ONNX LayerNormalization (its Y only): normalised over the axes from ``axis`` on."""
    if any(node.output[1:]):
        raise ValueError("LayerNormalization's Mean and InvStdDev outputs are not supported")
    dims = list(range(attr(node, "axis", -1) % x.dim(), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + attr(node, "epsilon", 1e-5)) * scale
    return y if bias is None else y + bias


def _range(node: onnx.NodeProto, start: Any, limit: Any, delta: Any) -> torch.Tensor:
    """ONNX Range: ``max(ceil((limit - start) / delta), 0)`` values (empty, not an error,
    when the limit lies behind the start)."""
    count = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
    return start + delta * torch.arange(count, dtype=start.dtype)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _pad(
    node: onnx.NodeProto,
    x: torch.Tensor,
    pads: Any = None,
    value: Any = None,
    axes: Any = None,
) -> torch.Tensor:
    """ONNX Pad (opset 2's attributes or opset 11+'s inputs, axes from opset 18)."""
    given = _ints(pads) if pads is not None else list(attr(node, "pads"))
    dims = [a % x.dim() for a in _ints(axes)] if axes is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for i, dim in enumerate(dims):
        full[dim], full[dim + x.dim()] = given[i], given[i + len(dims)]
    mode = attr(node, "mode", "constant")
    if mode not in _PAD_MODES:
        raise ValueError(f"Pad mode {mode!r} is not supported by the QAT interpreter")
    if min(full) < 0:
        raise ValueError(
            "Pad with negative pads (cropping) is not supported by the QAT interpreter"
        )
    fill = float(value) if value is not None and value.numel() else attr(node, "value", 0.0)
    if mode == "constant":
        return _padded(x, full, fill)
    # torch pads only the spatial dims of [N, C, ...] in these modes (1 to 3 of them)
    if any(full[d] or full[d + x.dim()] for d in (0, 1)) or not 3 <= x.dim() <= 5:
        raise ValueError(f"Pad mode {mode!r} of other than 1-3 spatial dims of [N, C, ...]")
    spatial = full[2 : x.dim()] + full[x.dim() + 2 :]
    return F.pad(x, _torch_pads(spatial), mode=_PAD_MODES[mode])


def _softmax(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return lambda node, x: fn(x, dim=attr(node, "axis", -1))


def _split(
    node: onnx.NodeProto, x: torch.Tensor, sizes: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    axis = attr(node, "axis", 0)
    parts = _ints(sizes) if sizes is not None else list(attr(node, "split", []))
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
    "LeakyRelu": lambda n, x: F.leaky_relu(x, attr(n, "alpha", 0.01)),
    "HardSigmoid": lambda n, x: torch.clamp(attr(n, "alpha", 0.2) * x + attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda n, x: x * torch.clamp(x / 6 + 0.5, 0, 1),
    "Clip": _clip,
    "BatchNormalization": _batchnorm,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "LayerNormalization": _layer_norm,
    "Min": lambda n, *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(dim=0),
    "Max": lambda n, *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(dim=0),
    "Not": lambda n, x: torch.logical_not(x),
    "And": lambda n, a, b: torch.logical_and(a, b),
    "Or": lambda n, a, b: torch.logical_or(a, b),
    "Equal": lambda n, a, b: a == b,
    "Less": lambda n, a, b: a < b,
    "Greater": lambda n, a, b: a > b,
    "LessOrEqual": lambda n, a, b: a <= b,
    "GreaterOrEqual": lambda n, a, b: a >= b,
    "Reciprocal": lambda n, x: torch.reciprocal(x),
    "Range": _range,
    "Pad": _pad,
    "Where": lambda n, c, a, b: torch.where(c, a, b),
    "LSTM": _lstm,
    "Reshape": _reshape,
    "Flatten": lambda n, x: x.reshape(math.prod(x.shape[: attr(n, "axis", 1) % (x.dim() + 1)]), -1),
    "Transpose": lambda n, x: x.permute(*attr(n, "perm", list(reversed(range(x.dim()))))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Resize": _resize,
    "Concat": lambda n, *xs: torch.cat([x for x in xs if x is not None], dim=attr(n, "axis")),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": lambda n, x: torch.tensor(
        list(x.shape)[attr(n, "start", 0) : attr(n, "end")], dtype=torch.int64
    ),
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Expand": lambda n, x, shape: x * torch.ones(_ints(shape), dtype=x.dtype),
    "Cast": _cast,
    "Identity": lambda n, x: x,
    "QuantizeLinear": lambda n, *a: None,  # run by QdqGraph._qdq (needs the scales)
    "DequantizeLinear": lambda n, *a: None,
}
"""What the interpreter runs (ai.onnx domain); anything else is refused before training."""
