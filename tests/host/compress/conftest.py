"""Fixtures for the compression tests: plugin sets, quick evaluation, saved models."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import models
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from slimfleet.agent.cli_runner import run_cli
from slimfleet.host.cli import cli
from slimfleet.host.compress.candidate import ACCEPTED, Candidate
from slimfleet.host.compress.evaluate import EvalSettings, Measurement
from slimfleet.host.plugins import Plugins, load_plugins, make_plugin_manager


@pytest.fixture
def make_plugins() -> Callable[..., Plugins]:
    """``make_plugins(extra, ...)``: the built-in plugins plus ``extra`` plugin objects."""

    def make(*extra: object) -> Plugins:
        pm = make_plugin_manager(entry_points=False)
        for plugin in extra:
            pm.register(plugin)
        pm.check_pending()
        return load_plugins(pm)

    return make


@pytest.fixture
def no_builtin_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the recipes a test registers: the built-in ones are disabled."""
    monkeypatch.setenv("SLIMFLEET_DISABLE_PLUGINS", "slimfleet.plugins.recipes")


@pytest.fixture
def quick() -> EvalSettings:
    """Few latency repeats: the tests check behaviour, never timings."""
    return EvalSettings.quick()


@pytest.fixture
def save_model(tmp_path: Path) -> Callable[..., Path]:
    def save(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        return models.save(model, tmp_path / "models" / name)

    return save


@pytest.fixture
def outlier_mlp() -> onnx.ModelProto:
    """An MLP whose second weight has one huge entry: int8 ruins mm2, barely touches mm1.

    The outlier sits on a hidden unit that Relu always zeroes (its bias is -1000), so
    it wrecks mm2's quantization scale without amplifying mm1's small errors.
    """
    model = models.mlp()
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init).copy()
        if init.name == "w2":
            array[0, 0] = 200.0
        elif init.name == "b1":
            array[0] = -1000.0
        init.CopyFrom(numpy_helper.from_array(array, init.name))
    return model


@pytest.fixture
def unrunnable() -> onnx.ModelProto:
    """Valid ONNX that onnxruntime loads but cannot run: reshape 4 values into 3."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [3])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "unrunnable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture
def make_candidate() -> Callable[..., Candidate]:
    """``make_candidate(id, latency_ms, size_bytes, status=ACCEPTED, lossless=False)``."""

    def make(
        id_: int, latency: float, size: int, status: str = ACCEPTED, lossless: bool = False
    ) -> Candidate:
        candidate = Candidate(id_, f"r{id_}", f"r{id_}", f"r{id_}", lossless=lossless)
        candidate.status, candidate.size_bytes = status, size
        candidate.measurement = Measurement(latency_ms={"median": latency})
        return candidate

    return make


@pytest.fixture
def slimfleet(monkeypatch):
    """Run ``slimfleet ARGS`` in-process through the real entry point (``run_cli``).

    Returns (exit code, stdout, stderr).
    """
    root = logging.getLogger()

    def run(*args: str) -> tuple[int, str, str]:
        handlers, level = root.handlers[:], root.level
        monkeypatch.setattr(sys, "argv", ["slimfleet", *map(str, args)])
        with CliRunner().isolation() as (out, err, _):
            try:
                run_cli(cli, "slimfleet")
            except SystemExit as exc:
                code = exc.code
        root.handlers[:], root.level = handlers, level
        return code, out.getvalue().decode(), err.getvalue().decode()

    return run


@pytest.fixture
def mlp_case(tmp_path, save_model):
    data = tmp_path / "data.npz"  # 20 evaluation samples: chance agreement cannot pass
    np.savez(data, x=np.random.default_rng(5).normal(size=(40, 1, 64)).astype(np.float32))
    return save_model(models.mlp()), data
