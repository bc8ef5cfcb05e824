"""Pass ``normalize``: Constant-node weights to initializers, opset upgrade, shape inference.

Converters often emit weights as ``Constant`` nodes; onnxruntime's quantizer then
quantizes nothing (or fails with "Expected ... to be an initializer"). This pass moves
them into initializers, so every later pass sees ordinary weights. It is lossless.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import version_converter

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress.modelfile import constant_value, imports_default_domain, opset
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins.onnxgraph import (
    copy_model,
    error_line,
    fix_ir_version,
)

_IR_WITH_FREE_INITIALIZERS = 4  # before IR 4 every initializer had to be a graph input too


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of ``model`` converted to ai.onnx opset ``target`` (never downgraded).

    Returns an unchanged copy when the model's opset is already ``target`` or higher.
    Raises :class:`SlimfleetError` with one line when onnx's version converter cannot
    convert the model (for example an op it has no adapter for).
    """
    current = opset(model)
    if target <= current:
        return copy_model(model)
    newest = onnx.defs.onnx_opset_version()
    if target > newest:
        raise SlimfleetError(
            f"cannot upgrade opset {current} -> {target}: onnx knows up to {newest}"
        )
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeError/IndexError/...
        raise SlimfleetError(
            f"cannot upgrade opset {current} -> {target}: {error_line(exc)}"
        ) from None
    fix_ir_version(converted)
    return converted


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move Constant nodes of the main graph into initializers, in place; return how many.

    A Constant whose output is also a graph output stays, since an initializer
    cannot be one portably.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    kept, moved = [], 0
    for node in graph.node:
        value = constant_value(node)
        if value is None or node.output[0] in outputs:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
        model.ir_version = max(model.ir_version, _IR_WITH_FREE_INITIALIZERS)
    return moved


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """``model`` with inferred value_info, or the model as given and why inference failed."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True), ""
    except Exception as exc:  # onnx raises InferenceError and, for odd models, others
        return model, f"shape inference failed ({error_line(exc)})"


class Normalize(Pass):
    name = "normalize"
    description = (
        "Move Constant-node weights into initializers, upgrade the opset on request, "
        "infer shapes (lossless; lets the quantizers see every weight)"
    )
    lossless = True
    options = (Option("opset", int, 0, "upgrade to this ai.onnx opset (0 keeps the model's own)"),)

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        target, newest = options["opset"], onnx.defs.onnx_opset_version()
        if not 0 <= target <= newest:
            return f"opset={target}: onnx knows ai.onnx opsets 1 to {newest} (0 keeps the model's)"
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        out = copy_model(model)
        moved = constants_to_initializers(out)
        notes = [f"moved {moved} Constant tensors to initializers"] if moved else []
        before, target = opset(out), options["opset"]
        if target > before and not imports_default_domain(out):
            notes.append("opset kept: the model has no ai.onnx operators (only other domains)")
            target = 0
        if target > before:
            out = upgrade_opset(out, target)
            notes.append(f"opset {before} -> {target}")
        elif target:
            notes.append(f"opset {before} kept (>= {target})")
        known = len(out.graph.value_info)
        out, failure = infer_shapes(out)
        inferred = len(out.graph.value_info) - known
        if inferred > 0:
            notes.append(f"inferred {inferred} value shapes")
        if failure:
            notes.append(failure)
        changed = bool(moved or target > before or inferred > 0)
        if not changed:
            notes.insert(0, "changed nothing: no Constant weights, opset kept, shapes known")
        return PassResult(out, changed, "; ".join(notes))


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``normalize`` pass."""
    passes.add(Normalize())
