"""The deployment file: what it reads, the file:line of every error, writing it back."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from slimfleet.agent.deployment import Gate, RemoteTier, SlotSpec
from slimfleet.agent.errors import ConfigError, InputError
from slimfleet.agent.wire import ModelRef
from slimfleet.host.fleet.deployfile import (
    dump_deployment,
    load_deployment,
    parse_deployment,
    set_gate,
)

GOOD = """\
slots:
  det:
    models: [ocr-det@3]
  rec:
    models: [ocr-rec@5, ocr-rec@4]
    gate: {function: ctc_min_prob, threshold: 0.81}
    remote: {url: "http://ocr.example/v2/models/rec/infer", timeout_s: 2}
"""


def test_reads_slots_tiers_gate_and_remote() -> None:
    deployment = parse_deployment(GOOD)
    assert deployment == {
        "det": SlotSpec((ModelRef("ocr-det", 3),)),
        "rec": SlotSpec(
            (ModelRef("ocr-rec", 5), ModelRef("ocr-rec", 4)),
            Gate("ctc_min_prob", 0.81),
            RemoteTier("http://ocr.example/v2/models/rec/infer", 2.0),
        ),
    }
    assert parse_deployment(dump_deployment(deployment)) == deployment


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (("ocr-det@3", "ocr-det"), "f.yaml:3: slots.det.models[0]: expected name@version"),
        (
            ("ocr-det@3", "ocr-det@0"),
            "f.yaml:3: slots.det.models[0]: model version must be from 1 to 9223372036854775807, got 0",
        ),
        (('"http://ocr', '"ftp://ocr'), "f.yaml:7: slots.rec.remote.url: expected an http(s) URL"),
        (
            ('"http://ocr', '"http://[::1'),
            "f.yaml:7: slots.rec.remote.url: expected an http(s) URL",
        ),
        (
            ('"http://ocr', '"http://ocr:x'),
            "f.yaml:7: slots.rec.remote.url: expected an http(s) URL",
        ),
        (("timeout_s: 2", "timeout_s: 600"), "f.yaml:7: slots.rec.remote.timeout_s: expected"),
        (("threshold: 0.81", "threshold: high"), "f.yaml:6: slots.rec.gate: expected {'function'"),
        (("ocr-rec@5, ocr-rec@4", "ocr-rec@5, ocr-rec@5"), "f.yaml:5: slots.rec.models: a model"),
        (("  det:", "  Det:"), "f.yaml:2: invalid slot name 'Det'"),
        (
            ("    models: [ocr-det@3]", "    model: [ocr-det@3]"),
            "f.yaml:3: slots.det.model: unknown",
        ),
        (("slots:", "slot:"), "f.yaml:1: slot: unknown key 'slot'"),
        (
            (
                "    models: [ocr-det@3]",
                "    models: [ocr-det@3]\n    gate: {function: max_prob, threshold: 0.5}",
            ),
            "f.yaml:4: slots.det.gate: a gate escalates to a second model or a remote tier",
        ),
        (("ocr-det@3]", "ocr-det@3"), "f.yaml:4: invalid YAML"),
    ],
)
def test_errors_name_file_line_and_field(change: tuple[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_deployment(GOOD.replace(*change), "f.yaml")
    assert str(info.value).startswith(error), str(info.value)


def test_empty_slots_and_missing_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="f.yaml:1: slots: expected at least one slot"):
        parse_deployment("slots: {}\n", "f.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_deployment(tmp_path / "missing.yaml")


def test_set_gate_writes_the_threshold_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(GOOD)
    set_gate(path, "rec", Gate("ctc_min_prob", 0.93))
    again = load_deployment(path)
    assert again["rec"].gate == Gate("ctc_min_prob", 0.93)
    assert again["rec"].remote == parse_deployment(GOOD)["rec"].remote
    assert again["det"] == parse_deployment(GOOD)["det"]
    with pytest.raises(InputError, match=r"no slot 'cls' to set a gate on \(slots: det, rec\)"):
        set_gate(path, "cls", Gate("max_prob", 0.5))
    assert textwrap.dedent(path.read_text()).startswith("slots:")


def test_a_gate_on_a_slot_with_nowhere_to_escalate_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(GOOD)
    with pytest.raises(InputError, match="slot 'det': a gate escalates to a second model"):
        set_gate(path, "det", Gate("max_prob", 0.5))
    assert path.read_text() == GOOD  # nothing written
