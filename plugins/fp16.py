"""Pass ``fp16``: float32 weights and activations to float16, graph inputs/outputs kept float32.

Written with onnx alone. Every float32 value gets a home type: float16, or float32
where it must stay so (graph inputs/outputs, inputs the ONNX schema allows only in
float32 such as Resize scales, nodes kept on request or of unknown domains). A Cast
is inserted wherever a value is read in the other type. Weights beyond the float16
range are clamped, and the notes say so (simplify first folds BatchNorm statistics,
the usual culprits, into Conv weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimfleet.host.compress.modelfile import DEFAULT_DOMAINS, opset
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins.normalize import constants_to_initializers, infer_shapes
from slimfleet.plugins.onnxgraph import copy_model, has_subgraphs

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)
_ALWAYS_FLOAT32 = frozenset(
    {"Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}
    | {"EyeLike", "Bernoulli", "Multinomial"}
)
"""Ops whose float output type is set by an attribute this pass does not rewrite."""


class Fp16(Pass):
    name = "fp16"
    description = (
        "float16 weights and activations (about half the size), float32 graph inputs and "
        "outputs; clamps weights beyond ±65504 and says so"
    )
    options = (
        Option("keep_ops", list, [], "op types kept in float32, joined with + (Cast around)"),
        Option("exclude_nodes", list, [], "names of nodes kept in float32, joined with +"),
    )

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        if has_subgraphs(model):
            return "has If/Loop/Scan subgraphs, which this pass does not convert"
        if not any(t.data_type == FLOAT for t in _float_sources(model)):
            return "no float32 weights or constants"
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        out = copy_model(model)
        constants_to_initializers(out)
        plan = _Plan(out, set(options["keep_ops"]), set(options["exclude_nodes"]))
        clamped, flushed = plan.convert_initializers()
        if not plan.converted:
            return PassResult(copy_model(model), False, "changed nothing: no float32 weights")
        plan.rewrite_nodes()
        size = (model.ByteSize() / 1e6, out.ByteSize() / 1e6)
        notes = [
            f"float16: {len(plan.converted)} weight tensors, {plan.casts} Casts, "
            f"{plan.kept} nodes kept in float32; {size[0]:.2f} MB -> {size[1]:.2f} MB"
        ]
        if clamped:
            notes.append(
                f"clamped {sum(clamped.values())} weights beyond ±65504 in "
                f"{', '.join(sorted(clamped)[:5])} (simplify first folds BatchNorm into Conv)"
            )
        if flushed:
            notes.append(f"{flushed} weights below float16's range became 0")
        return PassResult(out, True, "; ".join(notes))


def _float_sources(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


class _Plan:
    """Home types of the float values of one graph, and the rewrite that honours them."""

    def __init__(self, model: onnx.ModelProto, keep_ops: set[str], keep_nodes: set[str]):
        self.graph = model.graph
        self.opset = opset(model)
        self.float_values = _float_value_names(model)
        self.keep = [_kept(n, keep_ops, keep_nodes, self.opset) for n in self.graph.node]
        self.kept = sum(self.keep)
        self.outputs = {o.name for o in self.graph.output}
        self.home = self._home_types()
        self.converted: list[str] = []
        self.casts = 0
        self._taken = {v for n in self.graph.node for v in (*n.input, *n.output)}
        self._taken.update(i.name for i in self.graph.input)
        self._taken.update(t.name for t in self.graph.initializer)

    def required(self, index: int, node: onnx.NodeProto) -> list[int | None]:
        """Per input: the float type this node reads there, None for non-float inputs."""
        only32 = _float32_slots(node.op_type, node.domain, self.opset, inputs=True)
        return [
            (FLOAT if self.keep[index] or only32(i) else HALF)
            if name in self.float_values
            else None
            for i, name in enumerate(node.input)
        ]

    def _home_types(self) -> dict[str, int]:
        home = {i.name: FLOAT for i in self.graph.input if i.name in self.float_values}
        needs: dict[str, set[int]] = {}
        for index, node in enumerate(self.graph.node):
            for name, dtype in zip(node.input, self.required(index, node), strict=True):
                if dtype is not None:
                    needs.setdefault(name, set()).add(dtype)
            only32 = _float32_slots(node.op_type, node.domain, self.opset, inputs=False)
            for i, name in enumerate(node.output):
                if name in self.float_values:
                    home[name] = FLOAT if self.keep[index] or only32(i) else HALF
        for init in self.graph.initializer:
            if init.data_type == FLOAT and init.name not in home:
                wanted = needs.get(init.name, set()) if init.name not in self.outputs else ()
                home[init.name] = HALF if HALF in wanted else FLOAT
        return home

    def convert_initializers(self) -> tuple[dict[str, int], int]:
        """float16 for initializers whose home is float16; returns clamp counts, flushed."""
        clamped: dict[str, int] = {}
        flushed = 0
        for index, init in enumerate(self.graph.initializer):
            if init.data_type != FLOAT or self.home.get(init.name) != HALF:
                continue
            values = numpy_helper.to_array(init)
            over = np.isfinite(values) & (np.abs(values) > FP16_MAX)
            if over.any():
                clamped[init.name] = int(over.sum())
            flushed += int(((values != 0) & (np.abs(values) < FP16_TINY)).sum())
            half = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
            self.graph.initializer[index].CopyFrom(numpy_helper.from_array(half, init.name))
            self.converted.append(init.name)
        return clamped, flushed

    def rewrite_nodes(self) -> None:
        """Rename, retype and insert Casts so every read sees the type it needs."""
        produced = {v: self._fresh(v, "fp16") for v in self.outputs if self.home.get(v) == HALF}
        casts: dict[tuple[str, int], str] = {}
        nodes: list[onnx.NodeProto] = []

        def read(name: str, dtype: int) -> str:
            source = produced.get(name, name)
            if self.home.get(name, dtype) == dtype:
                return source
            if (name, dtype) not in casts:
                casts[name, dtype] = self._fresh(name, "fp16" if dtype == HALF else "fp32")
                nodes.append(_cast(source, casts[name, dtype], dtype))
            return casts[name, dtype]

        for index, node in enumerate(self.graph.node):
            for i, dtype in enumerate(self.required(index, node)):
                if dtype is not None:
                    node.input[i] = read(node.input[i], dtype)
            if not self.keep[index]:
                _retype_attributes(node)
            for i, name in enumerate(node.output):
                node.output[i] = produced.get(name, name)
            nodes.append(node)
        nodes.extend(_cast(source, name, FLOAT) for name, source in produced.items())
        self.casts = len(casts) + len(produced)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        for info in self.graph.value_info:
            if info.name in self.home and info.name not in self.outputs:
                info.type.tensor_type.elem_type = self.home[info.name]

    def _fresh(self, base: str, suffix: str) -> str:
        name, n = f"{base}_{suffix}", 1
        while name in self._taken:
            name, n = f"{base}_{suffix}_{n}", n + 1
        self._taken.add(name)
        return name


def _cast(source: str, target: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], name=f"{target}_cast", to=to)


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Cast(to=float) and ConstantOfShape(float value) produce float16 instead."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = HALF
        elif (
            node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == FLOAT
        ):
            value = numpy_helper.to_array(attr.t).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))


def _kept(node: onnx.NodeProto, keep_ops: set[str], keep_nodes: set[str], opset: int) -> bool:
    if node.op_type in keep_ops or node.name in keep_nodes or node.op_type in _ALWAYS_FLOAT32:
        return True
    return node.domain not in DEFAULT_DOMAINS or _schema(node.op_type, opset) is None


def _float_value_names(model: onnx.ModelProto) -> set[str]:
    """Names of float32 values: from declared and inferred types."""
    inferred, _ = infer_shapes(copy_model(model))
    graph = inferred.graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    names = {i.name for i in infos if i.type.tensor_type.elem_type == FLOAT}
    names.update(t.name for t in graph.initializer if t.data_type == FLOAT)
    return names


@cache
def _schema(op_type: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


@cache
def _float32_slots(op_type: str, domain: str, opset: int, inputs: bool) -> Callable[[int], bool]:
    """Whether the schema allows float32 but not float16 at an input (output) position;
    positions past the last formal parameter belong to it (variadic)."""
    schema = _schema(op_type, opset) if domain in DEFAULT_DOMAINS else None
    formals = (schema.inputs if inputs else schema.outputs) if schema else []
    if not formals:
        return lambda i: False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    only32 = []
    for formal in formals:
        types = allowed.get(formal.type_str, {formal.type_str})
        only32.append("tensor(float)" in types and "tensor(float16)" not in types)
    return lambda i: only32[min(i, len(only32) - 1)]


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``fp16`` pass."""
    passes.add(Fp16())
