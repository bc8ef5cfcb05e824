"""For the HTTP API tests and bench/attack_bench.py: a real-onnxruntime
:class:`InferenceBackend`, the small models it serves, and a plain HTTP call helper.

Not the agent's serving (that is the pipeline's): one onnxruntime session per slot, the
contract's errors by fault, and counters the tests read (requests, model errors,
client errors by slot).
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimfleet.agent.inference import (
    Answer,
    FeedError,
    InferenceError,
    ModelIO,
    NoModelError,
    TensorSpec,
    UnknownSlotError,
)
from slimfleet.agent.runtime import open_session
from slimfleet.agent.wire import ModelRef

_ORT_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "float16": np.float16,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "string": np.object_,
}


def _spec(arg: Any) -> TensorSpec:
    dtype = np.dtype(_ORT_TYPES[arg.type.removeprefix("tensor(").removesuffix(")")])
    return TensorSpec(arg.name, dtype, tuple(arg.shape))


class _Loaded:
    def __init__(self, ref: ModelRef, model: Path | bytes) -> None:
        self.ref = ref
        self.session = open_session(model)
        self.io = ModelIO(
            tuple(_spec(a) for a in self.session.get_inputs()),
            tuple(_spec(a) for a in self.session.get_outputs()),
        )


def _feed(spec: TensorSpec, value: Any, cast: bool) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=spec.dtype if cast else None)
    except (ValueError, TypeError) as exc:
        raise FeedError(f"input {spec.name!r}: cannot make a {spec.dtype}: {exc}") from None
    if array.dtype != spec.dtype:
        raise FeedError(f"input {spec.name!r} is {array.dtype}, the model takes {spec.dtype}")
    dims = spec.shape
    if array.ndim != len(dims) or any(
        isinstance(d, int) and d != n for d, n in zip(dims, array.shape, strict=True)
    ):
        raise FeedError(f"input {spec.name!r} has shape {list(array.shape)}, expected {list(dims)}")
    return array


class OrtBackend:
    """Slots of onnxruntime sessions; a slot mapped to None exists with no model."""

    def __init__(self, slots: Mapping[str, tuple[ModelRef, Path | bytes] | None]) -> None:
        self._lock = threading.Lock()  # guards _slots and the three counters
        self._slots: dict[str, _Loaded | None] = {
            slot: _Loaded(*spec) if spec else None for slot, spec in slots.items()
        }
        self.requests: Counter[str] = Counter()
        self.model_errors: Counter[str] = Counter()
        self.client_errors: Counter[str | None] = Counter()

    def load(self, slot: str, ref: ModelRef, model: Path | bytes) -> None:
        loaded = _Loaded(ref, model)
        with self._lock:
            self._slots[slot] = loaded

    def _loaded(self, slot: str) -> _Loaded:
        with self._lock:
            if slot not in self._slots:
                raise UnknownSlotError(f"no slot {slot!r} in the deployment")
            loaded = self._slots[slot]
        if loaded is None:
            raise NoModelError(f"slot {slot!r} has no model loaded")
        return loaded

    def slots(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def slot_io(self, slot: str) -> ModelIO:
        return self._loaded(slot).io

    def slot_model(self, slot: str) -> ModelRef:
        return self._loaded(slot).ref

    def ready(self) -> bool:
        with self._lock:
            return all(self._slots.values())

    def predict(self, slot: str, feeds: Mapping[str, Any], *, cast: bool = False) -> Answer:
        loaded = self._loaded(slot)
        names = [s.name for s in loaded.io.inputs]
        if sorted(feeds) != sorted(names):
            raise FeedError(f"slot {slot!r} takes inputs {names}, got {sorted(feeds)}")
        arrays = {s.name: _feed(s, feeds[s.name], cast) for s in loaded.io.inputs}
        with self._lock:
            self.requests[slot] += 1
        try:
            values = loaded.session.run(None, arrays)
        except Exception as exc:
            with self._lock:
                self.model_errors[slot] += 1
            first = str(exc).strip().splitlines()[0][:200]
            raise InferenceError(f"slot {slot!r}: {loaded.ref} failed: {first}") from None
        outputs = {s.name: v for s, v in zip(loaded.io.outputs, values, strict=True)}
        return Answer(model=loaded.ref, tier=str(loaded.ref), outputs=outputs)

    def client_error(self, slot: str | None) -> None:
        with self._lock:
            self.client_errors[slot] += 1

    def metrics_text(self) -> bytes:
        with self._lock:
            lines = [f'test_requests_total{{slot="{s}"}} {n}' for s, n in self.requests.items()]
            lines += [
                f'test_client_errors_total{{slot="{s or ""}"}} {n}'
                for s, n in self.client_errors.items()
            ]
        return ("\n".join(lines) + "\n").encode()


# -- models ------------------------------------------------------------------------


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any]) -> bytes:
    graph = helper.make_graph(nodes, "oip_test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def masked_add() -> bytes:
    """x FP32 [batch, 4], mask BOOL [batch, 4] -> y FP32 = x + 1 where mask else x,
    count INT64 [batch] = how many mask bits are set per row."""
    info = helper.make_tensor_value_info
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Add", ["x", "one"], ["x1"]),
        helper.make_node("Where", ["mask", "x1", "x"], ["y"]),
        helper.make_node("Cast", ["mask"], ["m64"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["m64", "axes"], ["count"], keepdims=0),
    ]
    inputs = [
        info("x", TensorProto.FLOAT, ["batch", 4]),
        info("mask", TensorProto.BOOL, ["batch", 4]),
    ]
    outputs = [
        info("y", TensorProto.FLOAT, ["batch", 4]),
        info("count", TensorProto.INT64, ["batch"]),
    ]
    return _model(nodes, inputs, outputs, [one, axes])


def lookup(table: int = 3) -> bytes:
    """ids INT64 [1, 3] -> vec FP16 [1, 3] = table[ids]; an id >= ``table`` makes
    onnxruntime fail at run time (a model failure, HTTP 500)."""
    info = helper.make_tensor_value_info
    values = numpy_helper.from_array(np.arange(table, dtype=np.float16) * 2, "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["vec"])]
    return _model(
        nodes,
        [info("ids", TensorProto.INT64, [1, 3])],
        [info("vec", TensorProto.FLOAT16, [1, 3])],
        [values],
    )


def text_in() -> bytes:
    """s STRING [1] -> u STRING [1] (Identity): an input the protocol calls BYTES."""
    info = helper.make_tensor_value_info
    nodes = [helper.make_node("Identity", ["s"], ["u"])]
    return _model(
        nodes, [info("s", TensorProto.STRING, [1])], [info("u", TensorProto.STRING, [1])], []
    )


def text_out() -> bytes:
    """x FP32 [1, 2] -> t STRING [1, 2] (Cast): an output the protocol calls BYTES."""
    info = helper.make_tensor_value_info
    nodes = [helper.make_node("Cast", ["x"], ["t"], to=TensorProto.STRING)]
    return _model(
        nodes, [info("x", TensorProto.FLOAT, [1, 2])], [info("t", TensorProto.STRING, [1, 2])], []
    )


def matmul_chain(width: int, depth: int, rows: int, seed: int = 0) -> bytes:
    """x FP32 [1, width] -> y FP32 [1, width]: x repeated to ``rows`` rows, through
    ``depth`` MatMul+Tanh layers, averaged over the rows. A small request, real work
    (rows * width**2 * depth multiply-adds), nothing sleeps."""
    info = helper.make_tensor_value_info
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(
            rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32), "w"
        ),
        numpy_helper.from_array(np.array([rows, width], np.int64), "rows"),
    ]
    nodes = [helper.make_node("Expand", ["x", "rows"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{depth}"], ["y"], axes=[0], keepdims=1))
    return _model(
        nodes,
        [info("x", TensorProto.FLOAT, [1, width])],
        [info("y", TensorProto.FLOAT, [1, width])],
        inits,
    )


# -- HTTP ----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json", self.headers
        return json.loads(self.body)

    def oip(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """An inference response: the JSON header and every output as an array."""
        size = self.headers.get("Inference-Header-Content-Length")
        size = len(self.body) if size is None else int(size)
        header = json.loads(self.body[:size])
        arrays, offset = {}, size
        for out in header["outputs"]:
            dtype = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "BOOL": np.bool_}[
                out["datatype"]
            ]
            if "data" in out:
                arrays[out["name"]] = np.array(out["data"], dtype=dtype).reshape(out["shape"])
                continue
            n = out["parameters"]["binary_data_size"]
            raw = self.body[offset : offset + n]
            arrays[out["name"]] = np.frombuffer(raw, dtype=dtype).reshape(out["shape"])
            offset += n
        assert offset == len(self.body), "binary parts add up to the body"
        return header, arrays


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        if own:
            conn.close()


DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.bool_): "BOOL", np.dtype(np.int64): "INT64"}


def tensor(name: str, array: np.ndarray, binary: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "shape": list(array.shape),
        "datatype": DATATYPE[array.dtype],
    }
    if binary:
        doc["parameters"] = {"binary_data_size": array.nbytes}
    else:
        doc["data"] = array.reshape(-1).tolist()
    return doc


def binary_body(doc: dict[str, Any], *arrays: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A request of JSON header ``doc`` followed by ``arrays`` as binary data."""
    head = json.dumps(doc).encode()
    body = head + b"".join(a.tobytes() for a in arrays)
    return body, {"Inference-Header-Content-Length": str(len(head))}
