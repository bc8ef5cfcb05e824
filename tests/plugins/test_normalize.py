"""normalize: Constant weights become initializers, opset upgrades, lossless."""

from __future__ import annotations

import models
import numpy as np
import onnx
import pytest

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.compress.modelfile import opset
from slimfleet.plugins.normalize import Normalize, upgrade_opset


def test_registers_through_the_hook(plugins):
    registry = plugins("normalize").passes
    assert registry.plugin_of("normalize") == "slimfleet.plugins.normalize"


def test_moves_constant_weights_to_initializers_losslessly(context, helpers):
    model = models.constant_weights()
    before = model.SerializeToString()
    result = Normalize().apply(model, context(), Normalize().resolve_options({}))
    assert result.changed
    assert "moved 4 Constant tensors" in result.notes
    assert helpers.ops(result.model)["Constant"] == 0
    assert {t.name for t in result.model.graph.initializer} == {"w1", "b1", "w2", "b2"}
    onnx.checker.check_model(result.model, full_check=True)
    assert model.SerializeToString() == before  # the input is untouched
    feed = helpers.feeds(model, 1)[0]
    np.testing.assert_array_equal(helpers.run(result.model, feed)[0], helpers.run(model, feed)[0])


def test_upgrades_the_opset_on_request(context, helpers):
    model = models.conv_bn_net(opset=12)
    result = Normalize().apply(model, context(), Normalize().resolve_options({"opset": "13"}))
    assert opset(result.model) == 13
    assert result.model.ir_version >= 7
    assert "opset 12 -> 13" in result.notes
    feed = helpers.feeds(model, 1)[0]
    np.testing.assert_allclose(
        helpers.run(result.model, feed)[0], helpers.run(model, feed)[0], rtol=1e-6, atol=1e-6
    )


def test_a_normalized_model_is_left_as_it_is(context):
    once = (
        Normalize()
        .apply(models.constant_weights(), context(), Normalize().resolve_options({}))
        .model
    )
    again = Normalize().apply(once, context(), Normalize().resolve_options({}))
    assert not again.changed
    assert again.notes.startswith("changed nothing")


def test_lower_target_opset_is_kept(context):
    result = Normalize().apply(
        models.mlp(opset=13), context(), Normalize().resolve_options({"opset": 11})
    )
    assert opset(result.model) == 13
    assert "opset 13 kept" in result.notes


def test_upgrade_opset_returns_a_converted_copy():
    model = models.conv_bn_net(opset=12)
    upgraded = upgrade_opset(model, 14)
    assert (opset(model), opset(upgraded)) == (12, 14)
    same = upgrade_opset(upgraded, 13)
    assert opset(same) == 14 and same is not upgraded


def test_upgrade_opset_beyond_onnx_is_one_clear_error():
    with pytest.raises(SlimfleetError, match=r"cannot upgrade opset 13 -> 99: onnx knows up to"):
        upgrade_opset(models.mlp(), 99)


@pytest.mark.parametrize("opset", [-1, onnx.defs.onnx_opset_version() + 1, 99])
def test_an_opset_onnx_does_not_know_is_a_skip_with_the_reason(context, opset):
    # it failed the candidate inside apply, so --passes 'normalize[opset=99]' exited 0
    normalize = Normalize()
    reason = normalize.check(models.mlp(), context(), normalize.resolve_options({"opset": opset}))
    assert reason == (
        f"opset={opset}: onnx knows ai.onnx opsets 1 to {onnx.defs.onnx_opset_version()} "
        "(0 keeps the model's)"
    )
    assert normalize.check(models.mlp(), context(), normalize.resolve_options({})) is None
