"""What the two int8 passes share: choosing nodes, running the quantizer, counting results."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import onnx
from onnx import TensorProto
from onnxruntime.quantization import QuantType

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress.modelfile import constant_weights
from slimfleet.host.passes import Option, PassContext, PassResult
from slimfleet.plugins.onnxgraph import (
    copy_model,
    describe_counts,
    error_line,
    or_list,
)

INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)
_OTHER_FLOATS = {
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "double",
    TensorProto.BFLOAT16: "bfloat16",
}
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
"""Ops quantized in QDQ only when their weight (input 1) is 8-bit."""


def op_types_option(supported: Iterable[str], note: str = "") -> Option:
    """The ``op_types`` option: which op types to quantize, from those ``supported``."""
    return Option(
        "op_types",
        list,
        [],
        f"op types to quantize, joined with + (e.g. MatMul+LSTM); empty: every op type "
        f"onnxruntime supports here{note}",
        choices=tuple(sorted(supported)),
    )


EXCLUDE_NODES = Option(
    "exclude_nodes",
    list,
    [],
    "names of nodes left in float, joined with + (what a per-layer fallback sets)",
)


def selected(
    model: onnx.ModelProto, op_types: list[str], supported: Iterable[str], exclude: list[str]
) -> list[onnx.NodeProto]:
    """The main-graph nodes the quantizer is asked to quantize."""
    wanted = set(op_types or supported)
    skip = set(exclude)
    return [n for n in model.graph.node if n.op_type in wanted and n.name not in skip]


def no_targets_reason(
    model: onnx.ModelProto, op_types: list[str], supported: Iterable[str], exclude: list[str]
) -> str:
    """One line saying why nothing is selected: no such nodes, or all of them excluded."""
    wanted = sorted(set(op_types or supported))
    present = [n for n in model.graph.node if n.op_type in wanted]
    if present:
        kinds = or_list(sorted({n.op_type for n in present}))
        return f"all {len(present)} {kinds} nodes are in exclude_nodes"
    if len(wanted) > 4:
        first = ", ".join(wanted[:3])
        return f"none of the {len(wanted)} op types to quantize ({first}, ...) is in the model"
    return f"no {or_list(wanted)} nodes"


def targets(
    model: onnx.ModelProto, op_types: list[str], supported: Iterable[str], exclude: list[str]
) -> tuple[list[onnx.NodeProto], str | None]:
    """:func:`selected`, and when it is empty, :func:`no_targets_reason`; when the
    model computes in float16 or double, that (onnxruntime's quantizer reads float32
    only: on such models it built invalid graphs or failed in its histograms). What it
    computes in is read from the selected nodes' weights, else from all the weights
    (an fp16 model keeps float32 inputs and outputs behind Casts), else from its inputs."""
    nodes = selected(model, op_types, supported, exclude)
    if not nodes:
        return nodes, no_targets_reason(model, op_types, supported, exclude)
    weights = {t.name: t.data_type for t in model.graph.initializer}
    floats = set(_OTHER_FLOATS) | {TensorProto.FLOAT}
    read = {weights[name] for node in nodes for name in node.input if name in weights}
    kinds = (
        (read & floats)
        or (set(weights.values()) & floats)
        or {i.type.tensor_type.elem_type for i in model.graph.input}
    )
    other = sorted(kinds & set(_OTHER_FLOATS))
    if other and TensorProto.FLOAT not in kinds:
        return nodes, (
            f"the model computes in {_OTHER_FLOATS[other[0]]}, and onnxruntime's quantizer "
            "reads float32 only (convert the model to float32 first)"
        )
    return nodes, None


def run_quantizer(
    model: onnx.ModelProto,
    context: PassContext,
    label: str,
    quantize: Callable[[Path, Path], None],
) -> onnx.ModelProto:
    """Run ``quantize(input_path, output_path)`` on ``model`` and load the result.

    Everything happens in a scratch folder of the workdir (removed afterwards), the
    quantizer's own temporary files included: it is also the working directory while the
    quantizer runs, because onnxruntime's symbolic shape inference writes
    ``sym_shape_infer_temp.onnx`` and uuid-named ``.data`` files into the current
    directory and leaves them there when it fails. Its root-logger chatter goes to the pass
    log at DEBUG; its crashes become one-line SlimfleetErrors.
    """
    scratch = (context.workdir / label).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    source, target = scratch / "input.onnx", scratch / "output.onnx"
    try:
        onnx.save(model, str(source))
        chatter = io.StringIO()  # calibration prints progress
        with (
            _quiet_root_logger(context),
            _tempdir(scratch),
            contextlib.chdir(scratch),  # process-wide, like _tempdir
            contextlib.redirect_stdout(chatter),
        ):
            quantize(source, target)
        context.log.debug("%s: %s", label, chatter.getvalue().strip())
        return onnx.load(str(target))
    except Exception as exc:  # the quantizer raises whatever onnx/onnxruntime raised
        raise SlimfleetError(
            f"{label}: onnxruntime's quantizer failed: {error_line(exc)}"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _tempdir(path: Path) -> Iterator[None]:
    """onnxruntime's quantizer writes augmented models through ``tempfile`` (process-wide
    setting: one quantizer at a time per process, as the search runs them)."""
    saved, tempfile.tempdir = tempfile.tempdir, str(path)
    try:
        yield
    finally:
        tempfile.tempdir = saved


@contextlib.contextmanager
def _quiet_root_logger(context: PassContext) -> Iterator[None]:
    """onnxruntime's quantizer warns on the root logger ("consider pre-processing")."""

    def to_debug(record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname:
            return True
        context.log.debug("onnxruntime: %s", record.getMessage())
        return False

    root = logging.getLogger()
    root.addFilter(to_debug)
    try:
        yield
    finally:
        root.removeFilter(to_debug)


def quantized_ops(before: onnx.ModelProto, after: onnx.ModelProto) -> Counter[str]:
    """Op types (as named in ``before``) of the nodes that got quantized, with counts.

    A node is quantized when it reads an 8-bit weight, directly (dynamic: MatMulInteger,
    ConvInteger, DynamicQuantizeLSTM...) or through DequantizeLinear (QDQ; for Conv,
    Gemm and MatMul that weight must be input 1), or when in QDQ a weightless node
    reads a dequantized input and its output is quantized again. Nodes that
    were quantized already in ``before`` are not counted again.
    """
    original = {n.name: n.op_type for n in before.graph.node if n.name}
    return _quantized_nodes(after, original) - _quantized_nodes(before, original)


def _quantized_nodes(model: onnx.ModelProto, original: dict[str, str]) -> Counter[str]:
    weights = {t.name for t in model.graph.initializer if t.data_type in INT8_TYPES}
    dequantized, requantized = set(), set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            dequantized.add(node.output[0])
            if node.input[0] in weights:
                weights.add(node.output[0])
        elif node.op_type == "QuantizeLinear":
            requantized.add(node.input[0])
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        if node.op_type in WEIGHT_OPS:
            quantized = len(node.input) > 1 and node.input[1] in weights
        else:
            quantized = bool(weights.intersection(node.input)) or bool(
                dequantized.intersection(node.input) and requantized.intersection(node.output)
            )
        if quantized:
            counts[_source_op(node, original)] += 1
    return counts


def _source_op(node: onnx.NodeProto, original: dict[str, str]) -> str:
    """The op type a quantized node came from: ORT names "mm1" -> "mm1_quant" and a Gemm
    "fc" -> "fc_MatMul" -> "fc_MatMul_quant"."""
    name = node.name.removesuffix("_quant")
    for candidate in (name, name.removesuffix("_MatMul")):
        if candidate in original:
            return original[candidate]
    return node.op_type


def unknown_names(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Names in ``names`` that no main-graph node carries."""
    known = {n.name for n in model.graph.node}
    return [n for n in names if n not in known]


def result(
    model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    summary: str,
    exclude: list[str],
) -> PassResult:
    """The PassResult of a quantizer run: "changed nothing" (and the input back) when no
    weight got quantized, else counts per op type, what stayed in float and ``summary``."""
    counts = quantized_ops(model, quantized)
    notes = []
    missing = unknown_names(model, exclude)
    if missing:
        notes.append(f"ignored unknown exclude_nodes {', '.join(missing)}")
    if not counts:
        why = "no node got quantized"
        if constant_weights(model):
            why += " (weights are Constant nodes, not initializers: run normalize first)"
        return PassResult(copy_model(model), False, "; ".join([f"changed nothing: {why}", *notes]))
    notes.insert(0, f"quantized {describe_counts(counts)} ({summary})")
    if len(exclude) > len(missing):
        notes.append(f"kept {len(exclude) - len(missing)} excluded nodes in float")
    return PassResult(quantized, True, "; ".join(notes))


def quant_type(name: str) -> QuantType:
    """``"int8"`` / ``"uint8"`` -> onnxruntime's QuantType."""
    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]
