"""agent.yaml: defaults, the shipped example, and errors that name file and line."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from slimfleet.agent.config import DEFAULT_MAX_MODEL_BYTES, HttpSettings, load_agent_config
from slimfleet.agent.errors import ConfigError
from slimfleet.agent.httplimits import HttpLimits
from slimfleet.agent.signing import generate_keypair
from slimfleet.agent.watch import WatchPolicy

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
device_id: cam-01
broker: mqtt://127.0.0.1:1883
prefix: slimfleet/test
public_keys: [keys/signing.pub]
store_dir: store
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    generate_keypair(tmp_path / "keys/signing.key", tmp_path / "keys/signing.pub")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "agent.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_minimal_config_gets_the_defaults(folder: Path) -> None:
    config = load_agent_config(write(folder, MINIMAL))
    assert config.path == folder / "agent.yaml"
    assert config.device_id == "cam-01"
    assert (config.broker.host, config.broker.port, config.broker.tls) == ("127.0.0.1", 1883, False)
    assert config.prefix == "slimfleet/test"
    assert config.topics.device("cam-01", "state") == "slimfleet/test/devices/cam-01/state"
    assert config.public_key_files == (folder / "keys/signing.pub",)
    assert len(config.public_keys) == 1 and len(config.verifier().key_ids) == 1
    assert config.store_dir == folder / "store"
    assert config.keep_versions == 3
    assert config.max_model_bytes == DEFAULT_MAX_MODEL_BYTES == 512 * 1024 * 1024
    assert config.threads == 1
    assert config.http is None
    assert config.telemetry_interval_s == 10.0
    assert config.smoke_max_latency_ms is None
    assert config.watch == WatchPolicy(30.0, 20, 0.05, 1.5)


def test_every_setting_is_read(folder: Path) -> None:
    generate_keypair(folder / "keys/second.key", folder / "keys/second.pub")
    text = MINIMAL.replace("[keys/signing.pub]", "[keys/signing.pub, keys/second.pub]") + (
        "keep_versions: 5\n"
        "max_model_bytes: 64 MiB\n"
        "threads: 2\n"
        "http: {port: 0}\n"
        "telemetry_interval_s: 0.5\n"
        "smoke: {max_latency_ms: 25}\n"
        "watch: {window_s: 0, min_requests: 5, max_error_rate: 0.1, max_p95_ratio: 2}\n"
    )
    config = load_agent_config(write(folder, text))
    assert len(config.verifier().key_ids) == 2
    assert (config.keep_versions, config.max_model_bytes, config.threads) == (5, 64 << 20, 2)
    assert config.http == HttpSettings("127.0.0.1", 0)
    assert config.telemetry_interval_s == 0.5
    assert config.smoke_max_latency_ms == 25.0
    assert config.watch == WatchPolicy(0.0, 5, 0.1, 2.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1000", 1000), ("'2 KB'", 2000), ("3KiB", 3072), ("1 GiB", 1 << 30), ("7 b", 7)],
)
def test_sizes_take_units(folder: Path, value: str, expected: int) -> None:
    config = load_agent_config(write(folder, MINIMAL + f"max_model_bytes: {value}\n"))
    assert config.max_model_bytes == expected


def test_http_null_disables_and_empty_uses_the_defaults(folder: Path) -> None:
    assert load_agent_config(write(folder, MINIMAL + "http: null\n")).http is None
    assert load_agent_config(write(folder, MINIMAL + "http: {}\n")).http == HttpSettings()


def test_http_limits_are_read_and_checked(folder: Path) -> None:
    text = MINIMAL + (
        "http: {port: 0, max_connections: 8, request_timeout_s: 5, idle_timeout_s: 2,\n"
        "       max_json_bytes: 1 MiB, max_binary_bytes: 16 MiB, max_inflight_bytes: 64 MiB}\n"
    )
    limits = load_agent_config(write(folder, text)).http.limits
    assert limits == HttpLimits(8, 5.0, 2.0, 1 << 20, 16 << 20, 64 << 20)
    bad = MINIMAL + "http:\n  max_json_bytes: 8 MiB\n  max_inflight_bytes: 16 MiB\n"
    with pytest.raises(ConfigError, match=r"agent.yaml:\d+.*max_inflight_bytes must hold"):
        load_agent_config(write(folder, bad))
    with pytest.raises(ConfigError, match="unknown"):
        load_agent_config(write(folder, MINIMAL + "http: {max_conections: 3}\n"))


def test_the_shipped_example_loads(tmp_path: Path) -> None:
    """examples/agent.yaml points at the keys 'slimfleet keys generate' writes at the root."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    generate_keypair(tmp_path / "keys/signing.key", tmp_path / "keys/signing.pub")
    config = load_agent_config(tmp_path / "examples/agent.yaml")
    assert config.device_id == "cam-01"
    assert config.prefix == "slimfleet/demo"
    assert config.http == HttpSettings("127.0.0.1", 8080)
    assert config.store_dir == tmp_path / "demo/cam-01"


def test_the_example_without_keys_names_the_line(tmp_path: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    example = tmp_path / "examples/agent.yaml"
    line = next(
        i
        for i, text in enumerate(example.read_text().splitlines(), 1)
        if text.strip() == "- ../keys/signing.pub"
    )
    with pytest.raises(
        ConfigError, match=rf"agent.yaml:{line}: public_keys\[0\]: .* does not exist"
    ):
        load_agent_config(example)


# Each case replaces or adds lines of MINIMAL; the error must name the line.
ERRORS = [
    ("unknown key", MINIMAL + "thread: 2\n", 6, r"unknown key 'thread'"),
    ("device id", MINIMAL.replace("cam-01", "cam/01"), 1, r"device_id: invalid name 'cam/01'"),
    ("device id type", MINIMAL.replace("cam-01", "[1]"), 1, r"device_id: expected a single value"),
    (
        "no device",
        MINIMAL.replace("device_id: cam-01\n", ""),
        1,
        r"missing required key 'device_id'",
    ),
    (
        "prefix",
        MINIMAL.replace("slimfleet/test", "fleet/#"),
        3,
        r"prefix: prefix must not start with .\$. or contain",
    ),
    ("prefix slashes", MINIMAL.replace("slimfleet/test", "a//b"), 3, "contain '//'"),
    ("broker", MINIMAL.replace("mqtt://", "http://"), 2, r"broker: broker URL must look like"),
    ("no keys", MINIMAL.replace("[keys/signing.pub]", "[]"), 4, r"at least one public key"),
    (
        "key file",
        MINIMAL.replace("signing.pub", "nope.pub"),
        4,
        r"public_keys\[0\]: .* does not exist",
    ),
    ("key not pem", MINIMAL.replace("signing.pub", "junk.pem"), 4, r"not a PEM public key"),
    ("private key", MINIMAL.replace("signing.pub", "signing.key"), 4, r"not a PEM public key"),
    ("keep", MINIMAL + "keep_versions: 0\n", 6, r"keep_versions: must be >= 1"),
    ("size", MINIMAL + "max_model_bytes: 12 parsecs\n", 6, r"expected a size like"),
    ("size zero", MINIMAL + "max_model_bytes: 0\n", 6, r"at least 1 byte"),
    ("threads", MINIMAL + "threads: two\n", 6, r"threads: expected an integer"),
    ("http key", MINIMAL + "http:\n  host: 127.0.0.1\n  prot: 80\n", 8, r"unknown key 'prot'"),
    ("http port", MINIMAL + "http:\n  port: 70000\n", 7, r"http.port: must be <= 65535"),
    ("http type", MINIMAL + "http: 8080\n", 6, r"http: expected a mapping"),
    ("interval", MINIMAL + "telemetry_interval_s: 0\n", 6, r"must be > 0"),
    ("interval inf", MINIMAL + "telemetry_interval_s: .inf\n", 6, r"expected a finite number"),
    ("interval nan", MINIMAL + "telemetry_interval_s: .nan\n", 6, r"expected a finite number"),
    ("interval huge", MINIMAL + "telemetry_interval_s: 86401\n", 6, r"must be <= 86400"),
    ("threads huge", MINIMAL + "threads: 100000000000000000000\n", 6, r"must be <= 1024"),
    ("watch window nan", MINIMAL + "watch:\n  window_s: .nan\n", 7, r"expected a finite"),
    ("watch window huge", MINIMAL + "watch:\n  window_s: 1000000\n", 7, r"must be <= 86400"),
    ("watch ratio nan", MINIMAL + "watch:\n  max_p95_ratio: .nan\n", 7, r"expected a finite"),
    ("watch rate nan", MINIMAL + "watch:\n  max_error_rate: .nan\n", 7, r"expected a finite"),
    ("smoke inf", MINIMAL + "smoke:\n  max_latency_ms: .inf\n", 7, r"expected a finite"),
    ("smoke", MINIMAL + "smoke:\n  max_latency_ms: -1\n", 7, r"smoke.max_latency_ms: must be > 0"),
    ("smoke key", MINIMAL + "smoke: {budget: 3}\n", 6, r"unknown key 'budget'"),
    ("watch ratio", MINIMAL + "watch:\n  max_p95_ratio: 0.5\n", 7, r"must be >= 1"),
    ("watch rate", MINIMAL + "watch:\n  max_error_rate: 5\n", 7, r"is a fraction"),
    ("watch count", MINIMAL + "watch:\n  min_requests: 0\n", 7, r"must be >= 1"),
    ("watch window", MINIMAL + "watch:\n  window_s: -3\n", 7, r"must be >= 0"),
    ("yaml", MINIMAL + "watch: [\n", 7, r"invalid YAML"),
    (
        "store is a file",
        MINIMAL.replace("store_dir: store", "store_dir: keys/junk.pem"),
        5,
        "not a folder",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_name_file_and_line(folder: Path, text: str, line: int, message: str) -> None:
    (folder / "keys/junk.pem").write_text("not a key\n")
    path = write(folder, text)
    with pytest.raises(ConfigError, match=rf"^{path}:{line}: .*{message}") as caught:
        load_agent_config(path)
    assert "\n" not in str(caught.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_agent_config(tmp_path / "absent.yaml")


def test_clock_skew_and_confidence_functions(folder: Path) -> None:
    config = load_agent_config(write(folder, MINIMAL))
    assert config.max_clock_skew_s == 300.0 and config.confidence_functions == {}
    text = MINIMAL + "max_clock_skew_s: 30\nconfidence_functions: {ctc: 'my_gates:ctc_min'}\n"
    config = load_agent_config(write(folder, text))
    assert config.max_clock_skew_s == 30.0
    assert config.confidence_functions == {"ctc": "my_gates:ctc_min"}
    for bad, message in (
        ("max_clock_skew_s: -1\n", ":6: "),
        ("confidence_functions: {ctc: my_gates}\n", "expected 'module:attr'"),
        ("confidence_functions: [a]\n", "expected a mapping"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_agent_config(write(folder, MINIMAL + bad))


def test_slashes_at_the_ends_of_the_prefix_are_dropped_and_said(folder: Path, caplog) -> None:
    """Accepted before Topics took one rule with fleet.yaml: configs on devices still load."""
    config = load_agent_config(write(folder, MINIMAL.replace("slimfleet/test", "/slimfleet/test/")))
    assert config.prefix == "slimfleet/test"
    assert "slashes at its ends are dropped" in caplog.text
