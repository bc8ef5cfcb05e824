import json

import numpy as np
import pytest

from slimfleet.agent.errors import VerifyError
from slimfleet.agent.wire import (
    MAX_PAYLOAD_BYTES,
    Desired,
    Manifest,
    SmokeTest,
    Topics,
    canonical_json,
    check_name,
    decode_tensor,
    encode_tensor,
    make_manifest,
    parse_json,
    sha256_hex,
    split_chunks,
)


def test_topics_layout_and_parse():
    t = Topics("/slimfleet/demo/")
    assert t.manifest("ocr", 3) == "slimfleet/demo/models/ocr/3/manifest"
    assert t.chunk("ocr", 3, 7) == "slimfleet/demo/models/ocr/3/chunk/7"
    assert t.device("cam-1", "desired") == "slimfleet/demo/devices/cam-1/desired"
    assert t.all_devices("telemetry") == "slimfleet/demo/devices/+/telemetry"
    assert t.parse_device_topic("slimfleet/demo/devices/cam-1/events") == ("cam-1", "events")
    assert t.parse_device_topic("slimfleet/other/devices/cam-1/events") is None
    assert t.parse_device_topic("slimfleet/demo/devices/cam-1/a/b") is None


@pytest.mark.parametrize("prefix", ["", "a/+/b", "a/#"])
def test_topics_reject_wildcard_prefix(prefix):
    with pytest.raises(ValueError):
        Topics(prefix)


@pytest.mark.parametrize(
    "name", ["", "a/b", "a+b", "x#", "has space", ".", "..", ".hidden", "-x", "é", "x" * 129]
)
def test_check_name_rejects_topic_breakers_and_path_tricks(name):
    with pytest.raises(ValueError, match="letters, digits"):
        check_name(name)


@pytest.mark.parametrize("name", ["ocr", "cam-01", "_a.b-c_9", "x" * 128, "1.2"])
def test_check_name_accepts_what_its_message_promises(name):
    assert check_name(name) == name


def test_canonical_json_is_order_independent():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    assert canonical_json({"a": "é"}) == b'{"a":"\\u00e9"}'


def test_split_chunks_sizes_and_limits():
    data = bytes(range(256)) * 10
    chunks = split_chunks(data, 1000)
    assert [len(c) for c in chunks] == [1000, 1000, 560]
    assert b"".join(chunks) == data
    assert split_chunks(b"", 10) == [b""]
    with pytest.raises(ValueError):
        split_chunks(data, MAX_PAYLOAD_BYTES + 1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint8", "bool"])
def test_tensor_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    back = decode_tensor(json.loads(json.dumps(encode_tensor(array))))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_decode_tensor_malformed_is_verify_error():
    with pytest.raises(VerifyError, match="smoke.x: malformed tensor"):
        decode_tensor({"dtype": "float32", "shape": [3], "data": "AAAA"}, "smoke.x")


def _manifest(**kw):
    smoke = SmokeTest({"x": np.ones((1, 4), np.float32)}, {"y": np.full((1, 4), 2, np.float32)})
    kw.setdefault("smoke", smoke)
    return make_manifest(
        "ocr",
        2,
        b"x" * 2500,
        io={"inputs": [], "outputs": []},
        opset=13,
        key_id="k1",
        chunk_size=1000,
        **kw,
    )


def test_manifest_round_trip_through_json():
    manifest, chunks = _manifest(ttl_s=60)
    assert manifest.chunk_count == 3 == len(chunks)
    assert manifest.chunks[0] == sha256_hex(b"x" * 1000)
    doc = json.loads(json.dumps(manifest.to_dict()))
    back = Manifest.from_dict(doc)
    assert back.sha256 == manifest.sha256 and back.size == 2500
    assert back.expires == pytest.approx(manifest.created + 60)
    np.testing.assert_array_equal(back.smoke.outputs["y"], manifest.smoke.outputs["y"])
    assert not back.expired(now=manifest.created + 1)
    assert back.expired(now=manifest.created + 61)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "desired"}, "not a manifest"),
        ({"schema": 99}, "unsupported manifest schema"),
        ({"version": "2"}, "'version'"),
        ({"version": True}, "'version'"),
        ({"size": 999999}, "chunks, size implies"),
        ({"chunk_size": 0}, "out of range"),
        ({"smoke": {"inputs": 3}}, "smoke test is malformed"),
        ({"expires": "tomorrow"}, "'expires'"),
        ({"expires": [1]}, "'expires'"),
        ({"expires": True}, "'expires'"),
        ({"expires": float("inf")}, "'expires'"),
        ({"created": float("nan")}, "'created'"),
        ({"sha256": "abc"}, "'sha256'"),
        ({"sha256": "A" * 64}, "'sha256'"),
        ({"chunks": ["0" * 64, "x" * 64, "0" * 64]}, r"'chunks\[1\]'"),
        ({"chunks": ["0" * 64, 7, "0" * 64]}, r"'chunks\[1\]'"),
        ({"report": [1, 2]}, "'report'"),
        ({"report": "fine"}, "'report'"),
        ({"smoke.max_latency_ms": "50"}, "max_latency_ms"),
        ({"smoke.max_latency_ms": -1}, "max_latency_ms"),
        ({"smoke.max_latency_ms": float("nan")}, "max_latency_ms"),
        ({"smoke.atol": float("nan")}, "atol"),
    ],
)
def test_manifest_validation_names_the_problem(change, message):
    doc = json.loads(json.dumps(_manifest()[0].to_dict()))
    for key, value in change.items():
        *parents, leaf = key.split(".")
        target = doc
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    with pytest.raises(VerifyError, match=message):
        Manifest.from_dict(doc)


def test_manifest_optional_fields_may_be_absent():
    doc = _manifest(smoke=None)[0].to_dict()
    for key in ("expires", "report", "smoke"):
        del doc[key]
    manifest = Manifest.from_dict(doc)
    assert (manifest.expires, manifest.report, manifest.smoke) == (None, {}, None)


def test_desired_round_trip_and_validation():
    desired = Desired("cam-1", "ocr", 3, "k1", rollback=True)
    back = Desired.from_dict(json.loads(json.dumps(desired.to_dict())))
    assert back == desired
    with pytest.raises(VerifyError, match="not a desired"):
        Desired.from_dict({"kind": "manifest"})
    with pytest.raises(VerifyError, match="malformed"):
        Desired.from_dict({"kind": "desired", "device": "d", "name": "a/b", "version": 1})
    bad = desired.to_dict() | {"version": 0}
    with pytest.raises(VerifyError, match="version must be >= 1"):
        Desired.from_dict(bad)


@pytest.mark.parametrize(
    "change", [{"version": 1e999}, {"version": float("nan")}, {"issued": float("inf")}]
)
def test_desired_with_a_non_finite_number_is_malformed(change):
    doc = json.loads(json.dumps(Desired("cam-1", "ocr", 3, "k1").to_dict() | change))
    with pytest.raises(VerifyError, match="desired state is malformed"):
        Desired.from_dict(doc)


def test_parse_json_errors_say_what():
    assert parse_json(b'{"a": 1}', "state") == {"a": 1}
    with pytest.raises(VerifyError, match="telemetry: not valid JSON"):
        parse_json(b"\xff{", "telemetry")
