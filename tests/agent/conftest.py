"""Model files for the agent tests: fast, genuinely slow, failing at run time, broken."""

from __future__ import annotations

from pathlib import Path

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _float(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _graph_model(nodes, name, inputs, outputs, inits) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    model = helper.make_model(
        helper.make_graph(nodes, name, inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])


def slow_add(value: float, rows: int = 32, width: int = 256, depth: int = 8) -> onnx.ModelProto:
    """y = x + value, plus an output ``work`` that depends on x through ``depth`` MatMuls.

    The MatMuls make the model itself slow (rows * width**2 * depth multiply-adds per
    request); nothing sleeps.
    """
    rng = np.random.default_rng(1)
    inits = [
        _float("c", np.full((4,), value)),
        helper.make_tensor("rows", TensorProto.INT64, [2], [rows, 4]),
        _float("p", rng.normal(0, 1, (4, width))),
        _float("w", rng.normal(0, 1 / np.sqrt(width), (width, width))),
    ]
    nodes = [
        helper.make_node("Add", ["x", "c"], ["y"]),
        helper.make_node("Expand", ["x", "rows"], ["xr"]),
        helper.make_node("MatMul", ["xr", "p"], ["h0"]),
    ]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{depth}"], ["work"]))
    work = helper.make_tensor_value_info("work", TensorProto.FLOAT, [rows, width])
    return _graph_model(nodes, "slow_add", [X], [Y, work], inits)


def gather_add(value: float, table: int = 2) -> onnx.ModelProto:
    """y = x + value for x in [0, table); other x make onnxruntime fail at run time.

    The inputs index a table (Gather on int(x)), like an embedding lookup that a new
    version shrank: its smoke sample (zeros) passes, real traffic fails.
    """
    inits = [_float("table", np.full((table,), value))]
    nodes = [
        helper.make_node("Cast", ["x"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["g"]),
        helper.make_node("Add", ["x", "g"], ["y"]),
    ]
    return _graph_model(nodes, "gather_add", [X], [Y], inits)


def two_inputs() -> onnx.ModelProto:
    """y = a + b."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", "b")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    return _graph_model(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two_inputs", inputs, [out], []
    )


class ModelFiles:
    """Writes test models into one folder, one file per call."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._count = 0

    def _save(self, model: onnx.ModelProto, stem: str) -> Path:
        self._count += 1
        return models.save(model, self.folder / f"{self._count:03d}-{stem}.onnx")

    def add(self, value: float) -> Path:
        return self._save(models.add_const(value), f"add{value:g}")

    def slow(self, value: float, **kwargs: int) -> Path:
        return self._save(slow_add(value, **kwargs), f"slow{value:g}")

    def gather(self, value: float, table: int = 2) -> Path:
        return self._save(gather_add(value, table), f"gather{value:g}")

    def mlp(self) -> Path:
        """Input x [batch, 64]: a free dimension, so no zeros can be made up for it."""
        return self._save(models.mlp(), "mlp")

    def two_inputs(self) -> Path:
        return self._save(two_inputs(), "two_inputs")

    def broken(self) -> Path:
        self._count += 1
        path = self.folder / f"{self._count:03d}-broken.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not an onnx model\x00\x01")
        return path


@pytest.fixture
def model_files(tmp_path: Path) -> ModelFiles:
    return ModelFiles(tmp_path / "model-files")
