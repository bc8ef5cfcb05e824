"""Helpers for the pass tests: inputs for a model, running it with onnxruntime, a context."""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pluggy
import pytest

from slimfleet.host import hookspecs
from slimfleet.host.passes import Feed, PassContext
from slimfleet.host.plugins import Plugins, load_plugins

DYNAMIC_DIM = 2


def make_feeds(model: onnx.ModelProto, count: int, seed: int = 0) -> list[Feed]:
    """``count`` random samples for the model's float inputs (dynamic dims set to 2)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for value in model.graph.input:
            dims = value.type.tensor_type.shape.dim
            shape = [d.dim_value if d.dim_value else DYNAMIC_DIM for d in dims]
            feed[value.name] = rng.normal(0, 1, shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def run(model: onnx.ModelProto, feed: Feed) -> list[np.ndarray]:
    """Outputs of ``model`` on ``feed`` with onnxruntime's CPU provider."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


@pytest.fixture
def context(tmp_path: Path) -> Callable[..., PassContext]:
    """``context(model=None, samples=16)``: a PassContext with a fresh workdir, calibrated
    on random samples of ``model`` when one is given."""

    def make(model: onnx.ModelProto | None = None, samples: int = 16) -> PassContext:
        workdir = tmp_path / f"work{len(list(tmp_path.iterdir()))}"
        calibration = make_feeds(model, samples, seed=1) if model is not None else []
        return PassContext(workdir=workdir, calibration=calibration)

    return make


@pytest.fixture
def helpers():
    """The plain helpers above, for tests (conftest modules are not importable)."""

    class Helpers:
        feeds = staticmethod(make_feeds)
        run = staticmethod(run)
        cosine = staticmethod(cosine)
        ops = staticmethod(ops)

    return Helpers


@pytest.fixture
def plugins() -> Callable[..., Plugins]:
    """``plugins("fp16", "recipes")``: what these built-in plugin modules register, through
    a plugin manager holding only them (the way make_plugin_manager registers them)."""

    def load(*names: str) -> Plugins:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for name in names:
            module = f"slimfleet.plugins.{name}"
            pm.register(importlib.import_module(module), name=module)
        pm.check_pending()
        return load_plugins(pm)

    return load
