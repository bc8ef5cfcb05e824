"""simplify: onnxsim folds BatchNorm into Conv; a crash or failed check keeps the input."""

from __future__ import annotations

import models
import numpy as np
import onnx
import onnxsim

from slimfleet.plugins.simplify import Simplify


def test_registers_through_the_hook(plugins):
    assert "simplify" in plugins("simplify").passes


def test_folds_batchnorm_into_conv(context, helpers):
    model = models.conv_bn_net()
    result = Simplify().apply(model, context(), Simplify().resolve_options({}))
    assert result.changed
    assert helpers.ops(result.model)["BatchNormalization"] == 0
    assert "BatchNorm folded into Conv" in result.notes
    assert not any(p.key.startswith("onnxsim") for p in result.model.metadata_props)
    feed = helpers.feeds(model, 1)[0]
    np.testing.assert_allclose(
        helpers.run(result.model, feed)[0], helpers.run(model, feed)[0], rtol=1e-4, atol=1e-5
    )


def test_a_simple_model_is_reported_unchanged(context):
    model = models.mlp()
    result = Simplify().apply(model, context(), Simplify().resolve_options({}))
    assert not result.changed
    assert result.notes == "changed nothing: onnxsim found nothing to fold or fuse"
    assert result.model.SerializeToString() == model.SerializeToString()


def _any_size_input() -> onnx.ModelProto:
    """conv_bn_net taking any image height and width (global pooling makes that valid)."""
    model = models.conv_bn_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim in dims[2:]:
        dim.dim_param = "side"
    return model


def test_dynamic_sizes_are_checked_on_a_calibration_sample(context, helpers):
    model = _any_size_input()
    without_data = Simplify().apply(model, context(), Simplify().resolve_options({}))
    assert not without_data.changed
    assert "onnxsim failed" in without_data.notes and "dynamic" in without_data.notes
    with_data = Simplify().apply(
        model, context(models.conv_bn_net()), Simplify().resolve_options({})
    )
    assert with_data.changed
    feed = {"input": np.random.default_rng(2).normal(size=(1, 3, 24, 40)).astype(np.float32)}
    np.testing.assert_allclose(
        helpers.run(with_data.model, feed)[0], helpers.run(model, feed)[0], rtol=1e-4, atol=1e-5
    )


def test_an_onnxsim_crash_keeps_the_input_model(context, monkeypatch):
    # A crash cannot be had on demand from onnxsim itself, hence the stand-in.
    def crash(model, **kwargs):
        raise RuntimeError("segment folding exploded\nsecond line")

    monkeypatch.setattr(onnxsim, "simplify", crash)
    model = models.conv_bn_net()
    result = Simplify().apply(model, context(), Simplify().resolve_options({}))
    assert not result.changed
    assert result.notes == (
        "changed nothing: onnxsim failed (segment folding exploded); kept the input model"
    )
    assert result.model.SerializeToString() == model.SerializeToString()


def test_a_failed_onnxsim_check_keeps_the_input_model(context, monkeypatch):
    monkeypatch.setattr(onnxsim, "simplify", lambda model, **kwargs: (model, False))
    result = Simplify().apply(models.conv_bn_net(), context(), Simplify().resolve_options({}))
    assert not result.changed
    assert "onnxsim's check found different outputs" in result.notes
