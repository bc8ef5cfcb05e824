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
* optionally (``learn_scales``) every scale, LSQ-style, as ``scale0 * exp(t)``;
* optionally (``train_float``) every float weight and bias of Conv, Gemm and MatMul, in
  units of its tensor's ``max|w| / 127`` (a float model: distillation after pruning).

:meth:`QdqGraph.write_back` writes the trained integers and scales into a copy of the
model, so onnxruntime then computes what the last forward pass computed. Operators
outside :data:`OPS` are refused up front (:func:`unsupported`). Memory: the forward
pass keeps the activations of one batch for the backward pass, as torch does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from slimfleet.host.compress.torchops import OPS, attr, tensor_of

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
FLOAT_TRAINED = ("Conv", "Gemm", "MatMul")
"""Ops whose float weight (input 1) and bias (input 2) ``train_float`` trains."""
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
        train_float: bool = False,
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
        self.consts = {name: tensor_of(a) for name, a in self.inits.items()}
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
        self.float_trained: set[str] = set()
        """Float initializers trained as they are (``train_float``), read as units x step."""
        self._shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        """Between :meth:`begin_step` and :meth:`end_step`: each trained initializer's
        dequantized value, and the detached leaf the forward passes read instead."""
        float_weights = float_weights or {}
        producers = {o: n for n in self.nodes for o in n.output}
        for node in self.nodes:
            if node.op_type == "DequantizeLinear" and node.input[0] in self.inits:
                self._trainable(node, producers, float_weights)
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and learn_scales:
                self._learnable_scale(node.input[1])
            if node.op_type in FLOAT_TRAINED and train_float:
                for name in node.input[1:3]:
                    self._trainable_float(name)

    def _trainable_float(self, name: str) -> None:
        if name in self.float_trained or self.types.get(name) != onnx.TensorProto.FLOAT:
            return
        value = torch.from_numpy(self.inits[name].astype(np.float32))
        step = torch.clamp(value.abs().max() / 127, min=1e-12)
        self.steps[name] = step
        self.units[self._key(name)] = torch.nn.Parameter(value / step)
        self.float_trained.add(name)

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
        axis = attr(node, "axis", 1)
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
        return _axis_shape(zero, rank, attr(node, "axis", 1))

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
        scale = _axis_shape(self.scale(node.input[1]), value.dim(), attr(node, "axis", 1))
        low, high = self.weight_range(name)
        return fake_quant(value, scale, zero, low, high) - zero

    # -- running ------------------------------------------------------------------------

    def forward(
        self, feed: Mapping[str, torch.Tensor], extra: Sequence[str] = ()
    ) -> list[torch.Tensor]:
        """The graph outputs, then the intermediate tensors named in ``extra``."""
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
        return [values[name] for name in [*self.outputs, *extra]]

    def _value(self, name: str, values: dict[str, Any]) -> Any:
        if name in values:
            return values[name]
        if name in self.float_trained:
            return self.units[self._key(name)] * self.steps[name]
        if name in self.consts:
            return self.consts[name]
        raise KeyError(f"tensor {name!r} is neither computed nor an initializer")

    def begin_step(self) -> None:
        """Quantize each trained weight once for the forward passes until :meth:`end_step`
        (not once per pass: on a model with millions of weights, that and its backward
        were most of a step's time), their gradients accumulating on shared leaves."""
        self._shared = {}

    def end_step(self) -> None:
        """Send the gradients accumulated since :meth:`begin_step` through the weights'
        quantization to the trained parameters, once."""
        shared, self._shared = self._shared or {}, None
        pairs = [(real, leaf.grad) for real, leaf in shared.values() if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])

    def _dequantize_trained(self, node: onnx.NodeProto) -> torch.Tensor:
        if self._shared is None or not torch.is_grad_enabled():
            return self._dequantized(node)
        name = node.input[0]
        if name not in self._shared:
            real = self._dequantized(node)
            self._shared[name] = (real, real.detach().requires_grad_())
        return self._shared[name][1]

    def _dequantized(self, node: onnx.NodeProto) -> torch.Tensor:
        name = node.input[0]
        integers = self.integers(name)
        if name in self.bias_of:
            x_scale, w_scale = self.bias_of[name]
            scale = self.scale(x_scale) * self.scale(w_scale)
            return integers * _axis_shape(scale, integers.dim(), 0)
        return integers * _axis_shape(
            self.scale(node.input[1]), integers.dim(), attr(node, "axis", 1)
        )

    def _qdq(self, node: onnx.NodeProto, args: list[Any]) -> Any:
        x = args[0]
        scale = self.scale(node.input[1]) if node.input[1] in self.consts else args[1].float()
        zero_name = node.input[2] if len(node.input) > 2 else ""
        zero = self.consts[zero_name].float() if zero_name else torch.zeros(())
        rank = x.dim()
        axis = attr(node, "axis", 1)
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
                if name in self.float_trained:
                    new[name] = (self.units[key] * self.steps[name]).numpy()
                    continue
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
