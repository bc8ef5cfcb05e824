"""Loading and saving ONNX model files the way ``compress`` and ``inspect`` need them.

Every problem with the file itself (missing, not ONNX, too big, a missing external data
file, operators onnxruntime does not know) is an :class:`InputError` whose message
names the file. Weights in external data files are read from beside the model when the
caller allows it (``compress`` does; ``publish`` ships one file and does not), and
:func:`save_model` writes external data only when the model would pass protobuf's 2 GB.
The helpers below it read a model without running it (its signature, a description)
or copy it to expose intermediate tensors (:func:`with_outputs`, for fallback ranking,
GPTQ, the refit and distillation).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from slimfleet.agent.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
"""The names of the default operator set (both spellings are one domain)."""
PROTOBUF_LIMIT = 2 * 1024**3
"""protobuf cannot parse a message of 2 GB or more; such models keep weights outside."""

CONSTANT_WEIGHT_MIN_ELEMENTS = 2
"""A Constant node holding at least this many floats counts as a weight, not a scalar."""


def load_model(path: Path | str, *, external_data: bool = False) -> onnx.ModelProto:
    """Read ``path`` as an ONNX model that onnxruntime knows every op of.

    With ``external_data``, weights stored in files beside the model are loaded into
    the returned model; without, such a model is an InputError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    size = path.stat().st_size
    if size >= PROTOBUF_LIMIT:
        raise InputError(
            f"{path}: {size / 1e9:.1f} GB is over the 2 GB protobuf limit; "
            "models with external data are not supported"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{path}: not an ONNX model (no graph)")
    if _uses_external_data(model):
        if not external_data:
            raise InputError(
                f"{path}: weights are stored in external data files; "
                "this command needs a self-contained model under 2 GB"
            )
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise InputError(
                f"{path}: cannot read its external data ({_first_line(exc)})"
            ) from None
    _check_operators(model, path)
    return model


EXTERNAL_DATA_LIMIT = PROTOBUF_LIMIT - 64 * 1024**2
"""Models whose serialized size reaches this are saved with external data (headroom
below protobuf's limit for the graph itself)."""


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path``: one file, or with its weights in ``<name>.data``
    beside it when it would reach :data:`EXTERNAL_DATA_LIMIT`. ``model`` is unchanged."""
    if model.ByteSize() < EXTERNAL_DATA_LIMIT:
        onnx.save_model(model, str(path))
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def external_files(path: Path) -> list[Path]:
    """The external data files ``path`` refers to (existing ones), without duplicates."""
    model = onnx.load(str(path), load_external_data=False)
    found: list[Path] = []
    for tensor in (t for g in _all_graphs(model.graph) for t in g.initializer):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        file = path.parent / location
        if location and file.is_file() and file not in found:
            found.append(file)
    return found


def total_size(path: Path) -> int:
    """Bytes of the model file and every external data file it refers to."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path))


def digest(model: onnx.ModelProto) -> str:
    """sha256 of the model's content; works past protobuf's 2 GB (hashed part by part)."""
    if model.ByteSize() < PROTOBUF_LIMIT:
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    h = hashlib.sha256()
    for tensor in model.graph.initializer:
        h.update(tensor.SerializeToString())
    for node in model.graph.node:
        h.update(node.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        h.update(value.SerializeToString())
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _uses_external_data(model: onnx.ModelProto) -> bool:
    tensors = [t for g in _all_graphs(model.graph) for t in g.initializer]
    tensors += [
        a.t
        for n in all_nodes(model.graph)
        for a in n.attribute
        if a.type == onnx.AttributeProto.TENSOR
    ]
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)


@cache
def _ort_operators() -> frozenset[tuple[str, str]]:
    """(domain, op) pairs onnxruntime has a schema for; "" and "ai.onnx" are one domain."""
    from onnxruntime.capi import _pybind_state

    known = {(s.domain or "", s.name) for s in _pybind_state.get_all_operator_schema()}
    return frozenset(known | {("ai.onnx", op) for domain, op in known if domain == ""})


def _check_operators(model: onnx.ModelProto, path: Path) -> None:
    local = {(f.domain, f.name) for f in model.functions}
    known = _ort_operators()
    for node in all_nodes(model.graph):
        key = (node.domain or "", node.op_type)
        if key not in known and key not in local:
            where = f"node {node.name!r}" if node.name else "a node"
            domain = f"custom domain {node.domain!r}" if node.domain else "the default domain"
            raise InputError(
                f"{path}: {where} uses op {node.op_type!r} from {domain}, "
                "which onnxruntime cannot run"
            )


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_graphs(sub)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for g in _all_graphs(graph):
        yield from g.node


def opset(model: onnx.ModelProto) -> int:
    """The ai.onnx opset the model imports (0 when it imports none)."""
    return max((e.version for e in model.opset_import if e.domain in DEFAULT_DOMAINS), default=0)


def imports_default_domain(model: onnx.ModelProto) -> bool:
    """True unless the model uses other domains only (a pure ``ai.onnx.ml`` model)."""
    return any(e.domain in DEFAULT_DOMAINS for e in model.opset_import)


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A positive size, the symbol, or None: ``-1`` and ``0`` (as Paddle writes a dynamic
    dimension) and a missing value are dynamic."""
    if d.HasField("dim_value") and d.dim_value > 0:
        return d.dim_value
    return d.dim_param or None


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """``{"name", "dtype", "shape"}``; a non-tensor (``seq(map(int64,tensor(float)))``, as
    scikit-learn's converters emit) has its type as ``dtype`` and shape None."""
    if not value.type.HasField("tensor_type"):
        return {"name": value.name, "dtype": _type_text(value.type), "shape": None}
    tensor = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    except (KeyError, TypeError):
        dtype = str(tensor.elem_type)
    shape = [_dim(d) for d in tensor.shape.dim] if tensor.HasField("shape") else None
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _type_text(type_: onnx.TypeProto) -> str:
    kind = type_.WhichOneof("value")
    if kind == "sequence_type":
        return f"seq({_type_text(type_.sequence_type.elem_type)})"
    if kind == "map_type":
        key = helper.tensor_dtype_to_np_dtype(type_.map_type.key_type).name
        return f"map({key},{_type_text(type_.map_type.value_type)})"
    if kind == "tensor_type":
        elem = type_.tensor_type.elem_type
        return f"tensor({helper.tensor_dtype_to_np_dtype(elem).name})"
    if kind == "optional_type":
        return f"optional({_type_text(type_.optional_type.elem_type)})"
    return kind or "unknown"


def name_dynamic_dims(model: onnx.ModelProto) -> int:
    """Rewrite input/output dims written as ``-1`` or ``0`` as named dynamic dims, in
    place; how many were rewritten. onnxruntime refuses data for a ``0`` dim, and shape
    inference and quantizers read ``-1`` as a size."""
    count = 0
    for value in [*model.graph.input, *model.graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                dim.dim_param = f"{value.name}_dim{index}"  # clears dim_value (a oneof)
                count += 1
    return count


def io_signature(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """``{"inputs": [...], "outputs": [...]}``, each ``{"name", "dtype", "shape"}``.

    Shapes hold ints for fixed dims and the dim name (or None) for dynamic ones;
    initializers listed as inputs (old IR versions) are left out.
    """
    weights = {t.name for t in model.graph.initializer}
    return {
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in weights],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor an ai.onnx Constant node holds, from its ``value`` (the node's own
    tensor: copy it before changing it) or ``value_float(s)``/``value_int(s)`` attribute;
    None for any other node, and for sparse and string constants."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return attr.t
    if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
        dtype = np.float32 if attr.name.startswith("value_float") else np.int64
        return numpy_helper.from_array(np.array(helper.get_attribute_value(attr), dtype=dtype))
    return None


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1


def constant_weights(model: onnx.ModelProto) -> list[str]:
    """Names of Constant nodes that hold float weights (converters export these).

    ORT's quantizer needs weights as initializers, so ``normalize`` moves them.
    """
    names = []
    for node in model.graph.node:
        tensor = constant_value(node)
        if (
            tensor is not None
            and tensor.data_type in _FLOAT_TYPES
            and _elements(tensor) >= CONSTANT_WEIGHT_MIN_ELEMENTS
        ):
            names.append(node.name or node.output[0])
    return names


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def describe(model: onnx.ModelProto, size_bytes: int | None = None) -> dict[str, Any]:
    """What ``slimfleet inspect`` shows: size, opset, io, op histogram, parameters."""
    constants = [t for n in model.graph.node if (t := constant_value(n)) is not None]
    histogram = Counter(
        f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node
    )
    return {
        "size_bytes": size_bytes if size_bytes is not None else model.ByteSize(),
        "ir_version": model.ir_version,
        "opset": opset(model),
        "opsets": {e.domain or "ai.onnx": e.version for e in model.opset_import},
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        **io_signature(model),
        "nodes": len(model.graph.node),
        "ops": dict(histogram.most_common()),
        "parameters": sum(_elements(t) for t in model.graph.initializer)
        + sum(_elements(t) for t in constants),
        "initializers": len(model.graph.initializer),
        "constant_weights": constant_weights(model),
    }


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names`` (graph
    inputs and tensors already output are left as they are), to read them on data."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    skip = {o.name for o in copy.graph.output} | {i.name for i in copy.graph.input}
    copy.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in skip
    )
    return copy
