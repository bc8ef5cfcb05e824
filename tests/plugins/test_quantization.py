"""quantization: what the int8 passes share (running onnxruntime's quantizer, counting)."""

from __future__ import annotations

from collections import Counter

import models
import numpy as np
import onnx
import pytest
from onnx.numpy_helper import to_array
from onnxruntime.quantization import quantize_dynamic

from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.passes import PassContext
from slimfleet.plugins import quantization as q


def test_run_quantizer_works_in_a_scratch_folder_it_removes(context):
    ctx = context()
    seen = []

    def quantize(source, target):
        seen.append(source.parent)
        quantize_dynamic(source, target)

    quantized = q.run_quantizer(models.mlp(), ctx, "label", quantize)
    assert q.quantized_ops(models.mlp(), quantized) == Counter({"MatMul": 2})
    assert seen == [ctx.workdir / "label"] and not seen[0].exists()


def test_a_quantizer_crash_is_one_line(context):
    ctx = context()

    def crash(source, target):
        raise ValueError("bad tensor\nmore detail")

    with pytest.raises(
        SlimfleetError, match=r"^label: onnxruntime's quantizer failed: bad tensor$"
    ):
        q.run_quantizer(models.mlp(), ctx, "label", crash)
    assert not (ctx.workdir / "label").exists()


def test_quantized_ops_skip_excluded_and_already_quantized_nodes(context):
    model = models.conv_bn_net()

    def only_conv2(source, target):
        quantize_dynamic(source, target, op_types_to_quantize=["Conv"], nodes_to_exclude=["conv1"])

    quantized = q.run_quantizer(model, context(), "dyn", only_conv2)
    assert q.quantized_ops(model, quantized) == Counter({"Conv": 1})
    assert q.quantized_ops(quantized, quantized) == Counter()


def test_no_targets_reason():
    model = models.mlp()
    assert q.no_targets_reason(model, ["LSTM"], ["LSTM", "MatMul"], []) == "no LSTM nodes"
    assert q.no_targets_reason(model, [], ["MatMul"], ["mm1", "mm2"]) == (
        "all 2 MatMul nodes are in exclude_nodes"
    )
    many = ["A", "B", "C", "D", "E"]
    assert q.no_targets_reason(model, many, many, []) == (
        "none of the 5 op types to quantize (A, B, C, ...) is in the model"
    )


@pytest.mark.parametrize(("dtype", "name"), [(np.float16, "float16"), (np.float64, "double")])
def test_a_model_computing_in_float16_or_double_is_refused_by_every_int8_pass(context, dtype, name):
    """onnxruntime's quantizer built invalid graphs (DynamicQuantizeLinear of float16) or
    failed in its histograms on these; static int8 of Relu alone (no weights) too."""
    from slimfleet.plugins.quantize_dynamic import QuantizeDynamic
    from slimfleet.plugins.quantize_static import QuantizeStatic

    model = models.mlp()
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for tensor in model.graph.initializer:
        tensor.CopyFrom(onnx.numpy_helper.from_array(to_array(tensor).astype(dtype), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = elem
    feeds = [{"x": np.ones((1, 64), dtype)}]
    ctx = PassContext(workdir=context().workdir, calibration=feeds)
    for pass_, options in ((QuantizeDynamic(), {}), (QuantizeStatic(), {"op_types": ["Relu"]})):
        reason = pass_.check(model, ctx, pass_.resolve_options(options))
        assert reason == (
            f"the model computes in {name}, and onnxruntime's quantizer reads float32 only "
            "(convert the model to float32 first)"
        )


def test_an_fp16_model_with_float32_inputs_and_outputs_is_refused_too(context):
    """slimfleet's own fp16 output keeps float32 at the edges, behind Casts."""
    from slimfleet.plugins.fp16 import Fp16
    from slimfleet.plugins.quantize_dynamic import QuantizeDynamic
    from slimfleet.plugins.quantize_static import QuantizeStatic

    half = Fp16().apply(models.mlp(), context(), Fp16().resolve_options({})).model
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ctx = PassContext(workdir=context().workdir, calibration=[{"x": np.ones((1, 64), np.float32)}])
    for pass_, options in ((QuantizeDynamic(), {}), (QuantizeStatic(), {"op_types": ["Relu"]})):
        reason = pass_.check(half, ctx, pass_.resolve_options(options))
        assert reason is not None and reason.startswith("the model computes in float16")
