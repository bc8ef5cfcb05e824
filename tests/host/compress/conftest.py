"""Fixtures for the compression tests: plugin sets, quick evaluation, saved models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import models
import onnx
import pytest

from slimfleet.host.compress.evaluate import EvalSettings
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
def quick() -> EvalSettings:
    """Few latency repeats: the tests check behaviour, never timings."""
    return EvalSettings.quick()


@pytest.fixture
def save_model(tmp_path: Path) -> Callable[..., Path]:
    def save(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        return models.save(model, tmp_path / "models" / name)

    return save
