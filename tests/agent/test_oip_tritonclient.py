"""The agent's HTTP API driven by a client nobody here wrote: NVIDIA's tritonclient[http]."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from oip_rig import OrtBackend
from tritonclient.utils import InferenceServerException

from slimfleet.agent.serve import HttpApi

X = np.arange(8, dtype=np.float32).reshape(2, 4)
MASK = np.array([[True, False, True, False], [True, True, True, True]])
Y = np.where(MASK, X + 1, X)


@pytest.fixture
def client(oip_api: HttpApi) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{oip_api.port}", network_timeout=30)


def _inputs(binary: bool, x: np.ndarray = X, mask: np.ndarray = MASK) -> list[triton.InferInput]:
    x_in = triton.InferInput("x", list(x.shape), "FP32")
    x_in.set_data_from_numpy(x, binary_data=binary)
    mask_in = triton.InferInput("mask", list(mask.shape), "BOOL")
    mask_in.set_data_from_numpy(mask, binary_data=binary)
    return [x_in, mask_in]


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("det") and client.is_model_ready("rec", "5")
    assert not client.is_model_ready("rec", "4")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("det")
    assert meta["versions"] == ["3"] and meta["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("x", "FP32", [-1, 4]),
        ("mask", "BOOL", [-1, 4]),
    ]


def test_infer_with_binary_inputs_and_outputs(
    client: triton.InferenceServerClient, oip_backend: OrtBackend
) -> None:
    result = client.infer("det", _inputs(binary=True), request_id="r1")
    np.testing.assert_array_equal(result.as_numpy("y"), Y)
    np.testing.assert_array_equal(result.as_numpy("count"), [2, 4])
    response = result.get_response()
    assert response["id"] == "r1" and response["model_version"] == "3"
    assert response["parameters"]["slimfleet_tier"] == "det@3"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    # a bigger batch, the version named in the path
    big = np.random.default_rng(0).normal(size=(512, 4)).astype(np.float32)
    mask = np.ones((512, 4), dtype=bool)
    result = client.infer("det", _inputs(True, big, mask), model_version="3")
    np.testing.assert_allclose(result.as_numpy("y"), big + 1)
    assert oip_backend.requests == {"det": 2}


def test_infer_with_json_inputs_and_outputs(client: triton.InferenceServerClient) -> None:
    outputs = [triton.InferRequestedOutput("y", binary_data=False)]
    result = client.infer("det", _inputs(binary=False), outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["y"]
    assert "data" in response["outputs"][0]
    np.testing.assert_array_equal(result.as_numpy("y"), Y)
    ids = triton.InferInput("ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.array([[1, 2, 0]], dtype=np.int64), binary_data=False)
    vec = client.infer("rec", [ids]).as_numpy("vec")
    assert vec.dtype == np.float16
    np.testing.assert_array_equal(vec, [[2, 4, 0]])


def test_errors_reach_the_client_as_one_line(
    client: triton.InferenceServerClient, oip_backend: OrtBackend
) -> None:
    wrong = triton.InferInput("x", [2, 4], "FP64")
    wrong.set_data_from_numpy(X.astype(np.float64))
    with pytest.raises(InferenceServerException, match="the model takes FP32") as caught:
        client.infer("det", [wrong, _inputs(True)[1]])
    assert caught.value.status() == "400"
    with pytest.raises(InferenceServerException, match="no slot 'nope'") as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "404"
    ids = triton.InferInput("ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.array([[1, 2, 9]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="rec@5 failed") as caught:
        client.infer("rec", [ids])
    assert caught.value.status() == "500"
    assert oip_backend.client_errors == {"det": 1, None: 1}
    assert oip_backend.model_errors == {"rec": 1}
