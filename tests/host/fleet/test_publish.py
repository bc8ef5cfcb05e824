"""publish_model against a real mosquitto; an independent paho subscriber
reassembles what was published and checks hashes and signatures."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import models
import numpy as np
import onnxruntime as ort
import pytest
from brokers import free_port

from slimfleet.agent.deployment import DesiredState
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.wire import MAX_PAYLOAD_BYTES, Manifest, ModelRef
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.deploy import assign_main
from slimfleet.host.fleet.publish import build_manifest, publish_manifest, publish_model

Collect = Callable[..., dict[str, Any]]
Fetch = Callable[[FleetConfig, str, int], tuple[Manifest, bytes, dict[str, Any]]]
ReadDesired = Callable[..., dict[str, DesiredState]]


def test_publish_outdir_puts_manifest_and_chunks_retained(
    fleet: FleetConfig, fetch: Fetch, outdir: Path
) -> None:
    calls: list[tuple[int, int]] = []
    result = publish_model(
        fleet,
        outdir,
        "net",
        3,
        chunk_size=4096,
        max_latency_ms=250.0,
        progress=lambda *a: calls.append(a),
    )
    model_bytes = (outdir / "model.onnx").read_bytes()
    expected_chunks = -(-len(model_bytes) // 4096)
    assert result.published and result.chunks == expected_chunks > 1
    assert calls == [(i, expected_chunks) for i in range(1, expected_chunks + 1)]

    manifest, data, _ = fetch(fleet, "net", 3)
    assert data == model_bytes
    assert (manifest.name, manifest.version, manifest.opset) == ("net", 3, 13)
    assert manifest.key_id == result.key_id == fleet.signer().key_id
    assert manifest.report == json.loads((outdir / "report.json").read_text())["summary"]
    assert manifest.io == {
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 3, 32, 32]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 10]}],
    }
    smoke = manifest.smoke
    assert smoke is not None and smoke.max_latency_ms == 250.0
    np.testing.assert_array_equal(smoke.inputs["input"], np.load(outdir / "sample.npz")["input"])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, smoke.inputs)
    np.testing.assert_allclose(smoke.outputs["logits"], logits, rtol=1e-5, atol=1e-6)
    assert smoke.atol >= 0.02 * float(np.abs(logits).max())
    assert manifest.expires is None


def test_bare_model_gets_a_random_smoke_input_with_dynamic_dims_as_one(
    fleet: FleetConfig,
    fetch: Fetch,
    tmp_path: Path,
) -> None:
    path = models.save(models.mlp(), tmp_path / "mlp.onnx")
    publish_model(fleet, path, "mlp", 1, ttl_s=3600)
    manifest, _, _ = fetch(fleet, "mlp", 1)
    assert manifest.io["inputs"][0]["shape"] == ["batch", 64]
    assert manifest.smoke is not None
    assert manifest.smoke.inputs["x"].shape == (1, 64)
    assert manifest.smoke.outputs["y"].shape == (1, 10)
    assert manifest.expires == pytest.approx(manifest.created + 3600)
    assert manifest.chunk_count == 1  # default 256 KiB chunks


def test_republishing_the_same_bytes_is_a_no_op(
    fleet: FleetConfig, fetch: Fetch, outdir: Path
) -> None:
    first = publish_model(fleet, outdir, "net", 1, chunk_size=8192)
    before, _, _ = fetch(fleet, "net", 1)
    again = publish_model(fleet, outdir, "net", 1, chunk_size=4096)
    assert first.published and not again.published
    assert (again.sha256, again.chunk_size, again.chunks) == (
        first.sha256,
        8192,
        first.chunks,
    )
    after, _, _ = fetch(fleet, "net", 1)
    assert after.created == before.created and after.chunk_size == 8192


def test_different_bytes_under_a_published_version_are_refused(
    fleet: FleetConfig,
    fetch: Fetch,
    outdir: Path,
    tmp_path: Path,
) -> None:
    publish_model(fleet, outdir, "net", 1)
    other = models.save(models.add_one(), tmp_path / "other.onnx")
    with pytest.raises(InputError) as info:
        publish_model(fleet, other, "net", 1)
    assert str(info.value) == (
        "version 1 of net is already published with different content; versions are immutable"
    )
    _, data, _ = fetch(fleet, "net", 1)
    assert data == (outdir / "model.onnx").read_bytes()
    assert publish_model(fleet, other, "net", 2).published


@pytest.mark.parametrize("version", [0, -1, 2**63, 10**300, True, "1", 1.0])
def test_version_must_be_an_integer_from_one(
    fleet: FleetConfig, outdir: Path, version: object
) -> None:
    with pytest.raises(
        InputError, match="model version must be (an integer|from 1 to 9223372036854775807)"
    ):
        publish_model(fleet, outdir, "net", version)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [0, -5, MAX_PAYLOAD_BYTES + 1])
def test_chunk_size_limits(fleet: FleetConfig, outdir: Path, chunk_size: int) -> None:
    with pytest.raises(InputError, match=rf"chunk size must be between 1 and {MAX_PAYLOAD_BYTES}"):
        publish_model(fleet, outdir, "net", 1, chunk_size=chunk_size)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ttl_s": float("nan")}, "ttl must be a positive finite number"),
        ({"ttl_s": float("inf")}, "ttl must be a positive finite number"),
        ({"ttl_s": 0.0}, "ttl must be a positive finite number"),
        ({"max_latency_ms": float("nan")}, "max latency must be a positive finite number"),
    ],
)
def test_non_finite_manifest_numbers_are_refused_before_anything_is_signed(
    fleet: FleetConfig, outdir: Path, options: dict[str, float], message: str
) -> None:
    # a NaN expiry used to be signed and retained: a manifest no device could read
    with pytest.raises(InputError, match=message):
        publish_model(fleet, outdir, "net", 1, **options)


@pytest.mark.parametrize("broker", ["strict_mosquitto", "embedded"])
def test_largest_chunk_size_fits_a_2mb_packet_limit(
    broker: str,
    request: pytest.FixtureRequest,
    make_fleet: Callable[[str], FleetConfig],
    fetch: Fetch,
    tmp_path: Path,
) -> None:
    """mosquitto 2.1 drops clients sending packets over 2 MB; amqtt has no limit."""
    fleet = make_fleet(request.getfixturevalue(broker).url)
    path = models.save(models.add_const(2.0, pad_bytes=3 * 1024 * 1024), tmp_path / "big.onnx")
    result = publish_model(fleet, path, "big", 1, chunk_size=MAX_PAYLOAD_BYTES)
    assert result.chunks == 2
    manifest, data, _ = fetch(fleet, "big", 1)
    assert manifest.chunk_size == MAX_PAYLOAD_BYTES and data == path.read_bytes()


def test_oversized_smoke_sample_is_dropped_with_a_warning(
    fleet: FleetConfig,
    fetch: Fetch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="slimfleet.host.fleet.publish")
    size = 400_000  # a 1.6 MB input: input + output in base64 exceed one packet
    path = models.save(models.add_const(1.0, size=size), tmp_path / "wide.onnx")
    result = publish_model(fleet, path, "wide", 1)
    assert len(result.warnings) == 1 and "without a smoke test" in result.warnings[0]
    assert "without a smoke test" in caplog.text
    assert result.manifest_bytes <= MAX_PAYLOAD_BYTES
    manifest, _, raw = fetch(fleet, "wide", 1)
    assert manifest.smoke is None
    assert len(raw[fleet.topics.manifest("wide", 1)].payload) == result.manifest_bytes


def test_manifest_over_the_packet_limit_is_an_error(
    fleet: FleetConfig, collect: Collect, tmp_path: Path
) -> None:
    path = models.save(models.add_const(1.0, pad_bytes=40_000), tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"over the .*packet limit: use a larger chunk size"):
        publish_model(fleet, path, "tiny-chunks", 1, chunk_size=1)
    assert collect(fleet.broker.url, f"{fleet.prefix}/models/#", 1, timeout=1.0) == {}


def test_publish_manifest_signs_a_hand_made_manifest(
    fleet: FleetConfig, fetch: Fetch, tmp_path: Path
) -> None:
    """The lower-level entry point: tests of the agent craft manifests (say, a smoke
    test the model cannot pass) and still get them signed and chunked."""
    signer = fleet.signer()
    manifest, chunks = build_manifest(
        signer, models.save(models.add_one(), tmp_path / "a.onnx"), "a", 1
    )
    assert manifest.smoke is not None
    manifest.smoke.outputs["y"] = manifest.smoke.outputs["y"] + 100.0
    publish_manifest(fleet, manifest, chunks, signer=signer)
    fetched, _, _ = fetch(fleet, "a", 1)
    assert fetched.smoke is not None
    np.testing.assert_array_equal(fetched.smoke.outputs["y"], manifest.smoke.outputs["y"])


def test_broker_down_is_one_line_naming_the_url(
    make_fleet: Callable[[str], FleetConfig], outdir: Path
) -> None:
    fleet = make_fleet(f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(SlimfleetError) as info:
        publish_model(fleet, outdir, "net", 1)
    assert type(info.value) is SlimfleetError and info.value.exit_code == 1
    assert str(info.value).startswith(f"cannot reach the MQTT broker at {fleet.broker.url}: ")
    assert "\n" not in str(info.value)


def test_publish_and_assign_over_mqtt5(
    fleet: FleetConfig, fetch: Fetch, desired: ReadDesired, tmp_path: Path
) -> None:
    fleet = replace(fleet, broker=replace(fleet.broker, protocol="5"))
    path = models.save(models.add_one(), tmp_path / "a.onnx")
    assert publish_model(fleet, path, "a", 1, chunk_size=100).published
    assert not publish_model(fleet, path, "a", 1).published
    _, data, _ = fetch(fleet, "a", 1)
    assert data == path.read_bytes()
    [sent] = assign_main(fleet, ModelRef("a", 1), ["cam-01"])
    assert desired(fleet, ["cam-01"])["cam-01"] == sent


def test_the_catalog_shows_an_expiry_past_any_calendar_without_failing() -> None:
    # a hostile manifest's expires: 1e300 made time.gmtime raise in 'slimfleet models'
    from slimfleet.host.fleet.catalog import PublishedModel, format_catalog

    text = format_catalog([PublishedModel("net", 1, expires=1e300, signature_valid=False)])
    assert "1e+300 s" in text
