import json

import numpy as np
import pytest

from slimfleet.agent.deployment import (
    DesiredState,
    Gate,
    RemoteTier,
    SlotSpec,
    http_url,
)
from slimfleet.agent.errors import VerifyError
from slimfleet.agent.wire import (
    MAX_PAYLOAD_BYTES,
    Manifest,
    ModelRef,
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
    t = Topics("slimfleet/demo")
    assert t.manifest("ocr", 3) == "slimfleet/demo/models/ocr/3/manifest"
    assert t.chunk("ocr", 3, 7) == "slimfleet/demo/models/ocr/3/chunk/7"
    assert t.device("cam-1", "desired") == "slimfleet/demo/devices/cam-1/desired"
    assert t.all_devices("telemetry") == "slimfleet/demo/devices/+/telemetry"
    assert t.parse_device_topic("slimfleet/demo/devices/cam-1/events") == ("cam-1", "events")
    assert t.parse_device_topic("slimfleet/other/devices/cam-1/events") is None
    assert t.parse_device_topic("slimfleet/demo/devices/cam-1/a/b") is None


@pytest.mark.parametrize("prefix", ["", "a/+/b", "a/#", "/a", "a/", "a//b", "$SYS/a", "a b"])
def test_topics_reject_wildcard_prefix(prefix):
    """The agent once stripped slashes where fleet.yaml refused them: one rule now."""
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


def _desired(**change):
    deployment = {
        "det": SlotSpec((ModelRef("ocr-det", 3),)),
        "rec": SlotSpec(
            (ModelRef("ocr-rec", 5), ModelRef("ocr-rec", 4)),
            Gate("ctc_min_prob", 0.81),
            RemoteTier("https://ocr.example/v2/models/rec/infer", 2.0),
        ),
    }
    doc = DesiredState("cam-1", deployment, "k1", 7, 100.0, 200.0, rollback=True).to_dict()
    return json.loads(json.dumps(doc | change))


def test_desired_state_round_trip():
    doc = _desired()
    back = DesiredState.from_dict(doc)
    assert back.to_dict() == doc
    assert back.refs() == [ModelRef("ocr-det", 3), ModelRef("ocr-rec", 5), ModelRef("ocr-rec", 4)]
    assert back.expired(now=200.0) and not back.expired(now=199.9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "manifest"}, "not a desired"),
        ({"schema": 1}, "schema 1"),
        ({"seq": 0}, "seq must be an integer from 1 to"),
        ({"seq": 2**53}, "seq must be an integer from 1 to 9007199254740991"),
        ({"seq": True}, "seq must be"),
        ({"issued": 300.0}, "issued < expires"),
        ({"expires": float("inf")}, "issued < expires"),
        ({"issued": float("nan")}, "issued < expires"),
        ({"deployment": {"Det": {"models": [{"name": "a", "version": 1}]}}}, "invalid slot"),
        ({"deployment": {"det": {"models": []}}}, "expected 1 to"),
        ({"deployment": {"det": {"models": [{"name": "a/b", "version": 1}]}}}, "invalid name"),
        ({"deployment": {"det": {"models": [{"name": "a", "version": 0}]}}}, "from 1 to"),
        ({"deployment": {"det": {"models": [{"name": "a", "version": 2**63}]}}}, "from 1 to"),
        (
            {"deployment": {"d": {"models": [{"name": "a", "version": 1}] * 2}}},
            "named twice",
        ),
        (
            {"deployment": {"d": {"models": [{"name": "a", "version": 1}], "x": 1}}},
            "unknown field",
        ),
        (
            {"deployment": {"d": {"models": [{"name": "a", "version": 1}], "gate": {}}}},
            "gate",
        ),
        (
            {
                "deployment": {
                    "d": {"models": [{"name": "a", "version": 1}], "remote": {"url": "ftp://x"}}
                }
            },
            "http",
        ),
    ],
)
def test_malformed_desired_states_say_what(change, message):
    with pytest.raises(VerifyError, match=message):
        DesiredState.from_dict(_desired(**change))


def test_parse_json_errors_say_what():
    assert parse_json(b'{"a": 1}', "state") == {"a": 1}
    with pytest.raises(VerifyError, match="telemetry: not valid JSON"):
        parse_json(b"\xff{", "telemetry")


def test_urls_and_deployments_read_as_people_type_them():
    from slimfleet.agent.slots import describe_loaded

    assert http_url("::1", 9100, "/metrics") == "http://[::1]:9100/metrics"
    assert http_url("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    loaded = {"rec": [ModelRef("r", 5).to_dict(), ModelRef("r", 4).to_dict()]}
    loaded["det"] = [ModelRef("d", 3).to_dict()]  # what DeploymentServer.current() returns
    assert describe_loaded(loaded) == "det: d@3; rec: r@5 > r@4"


def test_a_gate_with_nowhere_to_escalate_still_parses_on_the_device():
    """The deployment file refuses it; a device that holds one (signed before that rule)
    must not read its desired state as corrupt."""
    doc = {
        "models": [{"name": "a", "version": 1}],
        "gate": {"function": "max_prob", "threshold": 2},
    }
    spec = SlotSpec.from_dict(doc)
    assert spec.gate is not None and not spec.gate_escalates
