from __future__ import annotations

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import modelfile


def test_loads_a_valid_model(save_model):
    model = modelfile.load_model(save_model(models.conv_bn_net()))
    assert model.graph.name == "conv_bn_net"


def test_missing_file_names_it(tmp_path):
    with pytest.raises(InputError, match=r"nope\.onnx: no such model file"):
        modelfile.load_model(tmp_path / "nope.onnx")


@pytest.mark.parametrize(
    "content", [b"\x00\xff garbage \x13\x37" * 50, b"ir_version: 8\nthis is text\n", b""]
)
def test_corrupt_file_is_not_an_onnx_model(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"broken\.onnx: not an ONNX model") as info:
        modelfile.load_model(path)
    assert "\n" not in str(info.value)


def test_truncated_model_is_rejected(save_model):
    path = save_model(models.conv_bn_net())
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(InputError, match="not an ONNX model"):
        modelfile.load_model(path)


def test_over_two_gigabytes_is_rejected_before_reading(tmp_path):
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:  # sparse: takes no disk space
        f.truncate(modelfile.PROTOBUF_LIMIT + 1)
    with pytest.raises(InputError, match="over the 2 GB protobuf limit"):
        modelfile.load_model(path)


def test_external_data_is_rejected(tmp_path):
    model = models.add_const(1.0, size=1024)
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 2  # the model and its weights file
    with pytest.raises(InputError, match="external data"):
        modelfile.load_model(path)


def _custom_op_model(domain: str, op: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name="mystery", domain=domain)],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid("", 13)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets)


def test_custom_domain_op_is_rejected(save_model):
    path = save_model(_custom_op_model("com.acme", "Frobnicate"))
    with pytest.raises(InputError) as info:
        modelfile.load_model(path)
    message = str(info.value)
    assert "'mystery'" in message and "'Frobnicate'" in message and "'com.acme'" in message
    assert "onnxruntime cannot run" in message


def test_unknown_default_domain_op_is_rejected(save_model):
    with pytest.raises(InputError, match="'Frobnicate' from the default domain"):
        modelfile.load_model(save_model(_custom_op_model("", "Frobnicate")))


def test_onnxruntime_contrib_ops_are_accepted(save_model):
    model = modelfile.load_model(save_model(_custom_op_model("com.microsoft", "Gelu")))
    assert model.graph.node[0].op_type == "Gelu"


def test_io_signature_skips_initializers_listed_as_inputs():
    model = models.mlp()
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [64, 128]))
    signature = modelfile.io_signature(model)
    assert signature["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]
    assert signature["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 10]}]


def test_describe_counts_ops_parameters_and_constant_weights():
    info = modelfile.describe(models.constant_weights())
    assert info["opset"] == 13
    assert info["ops"] == {"Constant": 4, "MatMul": 2, "Add": 2, "Relu": 1}
    assert info["parameters"] == 64 * 128 + 128 + 128 * 10 + 10
    assert info["initializers"] == 0
    assert sorted(info["constant_weights"]) == ["const_b1", "const_b2", "const_w1", "const_w2"]
    plain = modelfile.describe(models.mlp(), size_bytes=123)
    assert plain["constant_weights"] == [] and plain["size_bytes"] == 123
    assert plain["parameters"] == info["parameters"]


def test_scalar_constants_are_not_weights():
    model = models.add_one()
    scalar = helper.make_tensor("s", TensorProto.FLOAT, [], [np.float32(2.0)])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["s"], name="s", value=scalar))
    assert modelfile.constant_weights(model) == []


def test_opset_of_a_model():
    assert modelfile.opset(models.mlp(opset=12)) == 12
    ml_only = models.mlp()
    ml_only.opset_import[0].domain = "ai.onnx.ml"
    assert modelfile.opset(ml_only) == 0 and not modelfile.imports_default_domain(ml_only)


def test_constant_value_reads_every_dense_form():
    def constant(**attribute):
        return helper.make_node("Constant", [], ["c"], **attribute)

    tensor = helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0])
    assert modelfile.constant_value(constant(value=tensor)) is not None
    assert modelfile.constant_value(constant(value_float=1.5)).data_type == TensorProto.FLOAT
    ints = modelfile.constant_value(constant(value_ints=[1, 2, 3]))
    assert ints.data_type == TensorProto.INT64 and list(ints.dims) == [3]
    assert modelfile.constant_value(constant(value_string="a")) is None
    assert modelfile.constant_value(helper.make_node("Relu", ["x"], ["y"])) is None
    custom = constant(value=tensor)
    custom.domain = "com.example"
    assert modelfile.constant_value(custom) is None


def test_load_reads_a_path_given_as_text(save_model):
    path = save_model(models.add_one())
    assert modelfile.load_model(str(path)).graph.node[0].op_type == "Add"


def test_a_non_tensor_output_is_described_by_its_type():
    model = models.add_one()
    seq = onnx.helper.make_tensor_sequence_value_info("y", onnx.TensorProto.FLOAT, None)
    model.graph.output[0].CopyFrom(seq)
    (output,) = modelfile.io_signature(model)["outputs"]
    assert output == {"name": "y", "dtype": "seq(tensor(float32))", "shape": None}


@pytest.mark.parametrize("dim", [-1, 0])
def test_minus_one_and_zero_dims_are_dynamic(dim):
    model = models.mlp()
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = dim
    assert modelfile.io_signature(model)["inputs"][0]["shape"] == [None, 64]


def test_external_data_is_loaded_from_beside_the_model_when_allowed(tmp_path):
    path = tmp_path / "ext.onnx"
    weights = "ext.onnx.data"
    onnx.save(
        models.add_const(1.0, size=1024),
        str(path),
        save_as_external_data=True,
        location=weights,
        size_threshold=0,
    )
    loaded = modelfile.load_model(path, external_data=True)
    assert not modelfile._uses_external_data(loaded)
    (weight,) = loaded.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(weight), np.ones(1024, np.float32))
    assert (
        modelfile.total_size(path)
        == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    )
    (tmp_path / "ext.onnx.data").unlink()
    assert modelfile.external_files(path) == []
    with pytest.raises(InputError, match="cannot read its external data"):
        modelfile.load_model(path, external_data=True)


def test_save_model_uses_external_data_only_past_the_limit(tmp_path, monkeypatch):
    model = models.add_const(1.0, size=4096)
    modelfile.save_model(model, tmp_path / "small.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]
    monkeypatch.setattr(modelfile, "EXTERNAL_DATA_LIMIT", 1000)
    modelfile.save_model(model, tmp_path / "big.onnx")
    assert modelfile.external_files(tmp_path / "big.onnx") == [tmp_path / "big.onnx.data"]
    assert not modelfile._uses_external_data(model)  # the caller's model is untouched
    reloaded = modelfile.load_model(tmp_path / "big.onnx", external_data=True)
    np.testing.assert_array_equal(
        numpy_helper.to_array(reloaded.graph.initializer[0]), np.ones(4096, np.float32)
    )


def test_with_outputs_adds_intermediate_tensors_once():
    import onnxruntime as ort

    def run(m, feed):
        return ort.InferenceSession(m.SerializeToString()).run(None, feed)

    model = models.mlp()
    probe = modelfile.with_outputs(model, ["h", "r", "h", "x", "y"])
    assert [o.name for o in probe.graph.output] == ["y", "h", "r"]
    assert [o.name for o in model.graph.output] == ["y"]  # the input model is untouched
    feed = {"x": np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)}
    y, h, r = run(probe, feed)
    np.testing.assert_allclose(run(model, feed)[0], y)
    assert h.shape[-1] == r.shape[-1] == 128
