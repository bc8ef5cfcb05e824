"""Open Inference Protocol v2 (KServe v2) REST payloads, as pure functions.

What the HTTP front door (:mod:`slimfleet.agent.serve`) parses and writes; no sockets
here. Covers the core protocol (server and model metadata, inference requests and
responses with JSON tensors) and the *binary tensor data* extension: an input whose
``parameters.binary_data_size`` is set takes its bytes from the body after the JSON
header (little-endian, row-major, BOOL one byte per element), and an output asked for
with ``parameters.binary_data`` (or every output, with the request parameter
``binary_data_output``) is answered the same way.

Not supported (each refused with a one-line 400): BYTES tensors as inputs, the shared
memory and classification extensions. A request's ``datatype`` must be the model
input's datatype (no silent casts); JSON data may be nested or flat, row-major.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimfleet.agent.errors import InputError
from slimfleet.agent.inference import Answer, InferenceError, ModelIO, TensorSpec
from slimfleet.agent.wire import ModelRef

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("binary_tensor_data",)

DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in (
        ("BOOL", np.bool_),
        ("UINT8", np.uint8),
        ("UINT16", np.uint16),
        ("UINT32", np.uint32),
        ("UINT64", np.uint64),
        ("INT8", np.int8),
        ("INT16", np.int16),
        ("INT32", np.int32),
        ("INT64", np.int64),
        ("FP16", np.float16),
        ("FP32", np.float32),
        ("FP64", np.float64),
    )
}
BYTES = "BYTES"
# Which numpy kinds a JSON array may hold for each datatype family (b bool, i/u int, f float).
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}
MAX_DIM = 2**31 - 1
MAX_RANK = 32
"""Most dimensions a tensor may have (numpy's limit is 64; no model here takes over 8)."""
_UNSUPPORTED_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "classification")


class ProtocolError(InputError):
    """The request does not follow the protocol or does not fit the model (HTTP 400)."""


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype (strings and objects are BYTES)."""
    if dtype.kind in "OUS":
        return BYTES
    for name, known in DATATYPES.items():
        if known == dtype.newbyteorder("<"):
            return name
    return dtype.name.upper()


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape]
    return {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": shape}


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "slimfleet-agent", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(slot: str, model: ModelRef, io: ModelIO) -> dict[str, Any]:
    """``GET /v2/models/{slot}``: the slot is the protocol's model name; its version is
    the version of the model serving the slot's first tier."""
    return {
        "name": slot,
        "versions": [str(model.version)],
        "platform": PLATFORM,
        "inputs": [_tensor_metadata(s) for s in io.inputs],
        "outputs": [_tensor_metadata(s) for s in io.outputs],
    }


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: feeds by input name, and the outputs to answer with
    (name -> binary?) in order; ``outputs`` None means every output."""

    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: dict[str, bool] | None
    binary_output: bool


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    return value


def _check_parameters(parameters: Mapping[str, Any], where: str) -> None:
    for name in _UNSUPPORTED_PARAMETERS:
        if name in parameters:
            raise ProtocolError(f"{where}: parameter {name!r} is not supported by this server")


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in value
    ):
        raise ProtocolError(
            f"{where}.shape must be a list of integers from 0 to {MAX_DIM} (numpy's limit; a "
            "[10**30, 0] tensor holds no values but no array can have that shape)"
        )
    if len(value) > MAX_RANK:
        raise ProtocolError(f"{where}.shape has {len(value)} dimensions, at most {MAX_RANK}")
    return tuple(value)


def _holds_bool(data: Any) -> bool:
    """Whether JSON ``data`` (nested lists) holds a boolean: numpy reads ``[1, true]`` as
    the integers ``[1, 1]``, which a number tensor must not take silently. Each list's
    element types are collected at C speed (a 1x3x224x224 tensor: ~3 ms, not ~30)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if type(item) is not list:
            if type(item) is bool:
                return True
            continue
        kinds = set(map(type, item))
        if bool in kinds:
            return True
        if list in kinds:
            stack.extend(item)
    return False


def _json_tensor(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    dtype = DATATYPES[datatype]
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        raise ProtocolError(f"{where}.data is ragged: nest it evenly or flatten it") from None
    count = math.prod(shape)
    if raw.size != count:
        raise ProtocolError(
            f"{where}.data has {raw.size} values, shape {list(shape)} needs {count}"
        )
    if raw.size and dtype.kind != "b" and raw.dtype.kind != "b" and _holds_bool(data):
        got = "a boolean among them"
    elif raw.size and raw.dtype.kind not in _JSON_KINDS[dtype.kind]:
        got = f"{raw.dtype.name} values"
    else:
        got = ""
    if got:
        raise ProtocolError(
            f"{where}.data must hold {_KIND_NAMES[dtype.kind]} for {datatype} (got {got})"
        )
    if raw.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"{where}.data has values outside the range of {datatype}")
    return raw.astype(dtype).reshape(shape)


def _input(
    doc: Any, index: int, io: ModelIO, binary: memoryview, offset: int
) -> tuple[str, np.ndarray, int]:
    """One request input as (name, array, bytes taken from the binary part)."""
    where = f"inputs[{index}]"
    if not isinstance(doc, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    name = doc.get("name")
    specs = {s.name: s for s in io.inputs}
    if name not in specs:
        known = ", ".join(repr(n) for n in specs)
        raise ProtocolError(
            f"{where}.name {name!r} is not an input of the model (it takes {known})"
        )
    where = f"input {name!r}"
    shape = _shape(doc.get("shape"), where)
    datatype = doc.get("datatype")
    expected = datatype_of(specs[name].dtype)
    if datatype == BYTES or expected == BYTES:
        raise ProtocolError(f"{where}: BYTES tensors are not supported by this server")
    if datatype != expected:
        raise ProtocolError(f"{where}.datatype is {datatype!r}, the model takes {expected}")
    parameters = _mapping(doc.get("parameters"), f"{where}.parameters")
    _check_parameters(parameters, where)
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in doc:
            raise ProtocolError(f"{where} has neither data nor parameters.binary_data_size")
        return name, _json_tensor(doc["data"], datatype, shape, where), 0
    if "data" in doc:
        raise ProtocolError(f"{where} has both data and parameters.binary_data_size")
    dtype = DATATYPES[datatype]
    needed = math.prod(shape) * dtype.itemsize
    if isinstance(size, bool) or not isinstance(size, int) or size != needed:
        raise ProtocolError(
            f"{where}.parameters.binary_data_size is {size!r}; "
            f"{datatype} {list(shape)} takes {needed} bytes"
        )
    if offset + size > len(binary):
        raise ProtocolError(
            f"{where}: the binary data after the JSON header ends at byte {len(binary)}, "
            f"this input needs bytes {offset} to {offset + size}"
        )
    array = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset)
    return name, array.reshape(shape), size


def _requested_outputs(value: Any, io: ModelIO, default_binary: bool) -> dict[str, bool] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError("outputs must be a list of {name, parameters}")
    known = {s.name for s in io.outputs}
    outputs: dict[str, bool] = {}
    for index, doc in enumerate(value):
        if not isinstance(doc, dict) or doc.get("name") not in known:
            names = ", ".join(repr(n) for n in sorted(known))
            raise ProtocolError(f"outputs[{index}] must name an output of the model ({names})")
        parameters = _mapping(doc.get("parameters"), f"outputs[{index}].parameters")
        _check_parameters(parameters, f"output {doc['name']!r}")
        binary = parameters.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {doc['name']!r}: parameters.binary_data must be a boolean")
        outputs[doc["name"]] = binary
    return outputs


def parse_infer(doc: Any, binary: memoryview, io: ModelIO) -> InferRequest:
    """Parse an inference request header (decoded JSON) and the binary part after it.

    Binary inputs are views into ``binary`` (no copy). Raises ProtocolError naming the
    field at fault, also when the binary part is longer or shorter than declared."""
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    parameters = _mapping(doc.get("parameters"), "parameters")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("parameters.binary_data_output must be a boolean")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("inputs must be a non-empty list of tensors")
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(inputs):
        name, array, taken = _input(tensor, index, io, binary, offset)
        if name in feeds:
            raise ProtocolError(f"input {name!r} is given twice")
        feeds[name] = array
        offset += taken
    if offset != len(binary):
        raise ProtocolError(
            f"the body has {len(binary)} bytes after the JSON header, the inputs declare {offset}"
        )
    outputs = _requested_outputs(doc.get("outputs"), io, binary_output)
    return InferRequest(request_id, feeds, outputs, binary_output)


def tier_parameters(answer: Answer) -> dict[str, str]:
    """Which tier produced the answer, as response parameters (and headers)."""
    parameters = {"slimfleet_tier": answer.tier}
    if answer.model is not None:
        parameters["slimfleet_model"] = str(answer.model)
    return parameters


def _binary(array: np.ndarray) -> bytes | memoryview:
    if array.dtype.kind in "OUS":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(v)) + v for v in items)
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(little.reshape(-1).view(np.uint8))


JSON_VALUE_COST = 80
"""Bytes one number of a JSON answer holds while it is built: a Python float (24), its
list slot (8), its text (up to 24) and the joined body (24)."""


def json_answer_cost(request: InferRequest, answer: Answer) -> int:
    """The bytes building the outputs asked for as JSON holds at once (a 16 MiB binary
    request once drew a 1.2 GB JSON answer that nothing counted; binary outputs are sent
    as the model's own arrays)."""
    selected = request.outputs or {name: request.binary_output for name in answer.outputs}
    return sum(
        answer.outputs[n].size * JSON_VALUE_COST
        for n, binary in selected.items()
        if not binary and n in answer.outputs
    )


def infer_response(
    slot: str, request: InferRequest, answer: Answer
) -> tuple[dict[str, Any], list[bytes | memoryview]]:
    """The response header (a JSON object) and the binary output parts, in order."""
    selected = request.outputs or {name: request.binary_output for name in answer.outputs}
    outputs: list[dict[str, Any]] = []
    parts: list[bytes | memoryview] = []
    for name, binary in selected.items():
        array = answer.outputs.get(name)
        if array is None:
            raise InferenceError(f"tier {answer.tier} answered without output {name!r}")
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            part = _binary(array)
            parts.append(part)
            tensor["parameters"] = {"binary_data_size": len(part)}
        elif array.dtype.kind in "OUS":
            tensor["data"] = [v.decode() if isinstance(v, bytes) else str(v) for v in array.flat]
        else:
            tensor["data"] = array.reshape(-1).tolist()
        outputs.append(tensor)
    header: dict[str, Any] = {"model_name": slot}
    if answer.model is not None:
        header["model_version"] = str(answer.model.version)
    if request.id is not None:
        header["id"] = request.id
    header["parameters"] = tier_parameters(answer)
    header["outputs"] = outputs
    return header, parts
