"""Issue 7 bad input, through the real CLI and a REAL agent: one clear line, exit 2 for
what the host can check (slot syntax, unpublished chain tiers, remote URLs); a gate
function that does not import is refused by the agent with its reason (exit 1), and the
agent keeps running and takes the next deployment."""

from __future__ import annotations

import models
import pytest
from e2e_rig import X, infer_json, serving


@pytest.fixture
def ocr(e2e):
    """ocr@7 (+1) and ocr@4 (+2) published; no agent."""
    e2e.publish(models.add_const(1.0), "ocr", 7)
    e2e.publish(models.add_const(2.0), "ocr", 4)
    return e2e


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--slot", "det"), "--slot 'det': expected SLOT=NAME@VERSION"),
        (("--slot", "a b=ocr@7"), "--slot 'a b=ocr@7': invalid slot name 'a b'"),
        (("--slot", "Det=ocr@7"), "invalid slot name 'Det'"),
        (("--slot", "det=ocr"), "--slot 'det=ocr': expected name@version"),
        (("--slot", "det=ocr@99"), "ocr@99 is not published"),
        (("--slot", "det=ocr@7", "--slot", "det=ocr@4"), "det"),  # one slot twice
    ],
)
def test_bad_slot_arguments_are_one_line_and_exit_2(ocr, args, line) -> None:
    run = ocr.cli("assign", *args, "--device", "d1", "--timeout", "2s")
    assert run.code == 2, run
    assert line in run.one_line_error()


@pytest.mark.parametrize(
    ("slots", "line"),
    [
        ("  main:\n    models: [ocr@7, ocr@5]\n", "ocr@5 is not published"),
        ("  main:\n    models: [ocr@7]\n  rec:\n    models: [rec@1]\n", "rec@1 is not published"),
        (
            "  main:\n    models: [ocr@7]\n    remote: {url: 'ftp://srv/v2/models/y/infer'}\n",
            "deployment.yaml:4: slots.main.remote.url: expected an http(s) URL",
        ),
        (
            "  main:\n    models: [ocr@7]\n    remote: {url: 'srv:8000/v2/models/y/infer'}\n",
            "deployment.yaml:4: slots.main.remote.url: expected an http(s) URL",
        ),
        ("  bad slot:\n    models: [ocr@7]\n", "deployment.yaml:2: invalid slot name 'bad slot'"),
        ("  main:\n    models: []\n", "deployment.yaml:3"),
    ],
)
def test_bad_deployment_files_are_one_line_and_exit_2(ocr, tmp_path, slots, line) -> None:
    file = tmp_path / "deployment.yaml"
    file.write_text("slots:\n" + slots)
    run = ocr.cli("assign", "--deployment", file, "--device", "d1", "--timeout", "2s")
    assert run.code == 2, run
    assert line in run.one_line_error()


@pytest.mark.parametrize(
    ("gate", "agent_yaml", "reason"),
    [
        (  # agent.yaml names it; the module is not there
            "mine",
            {"confidence_functions": {"mine": "nosuch_gates:conf"}},
            "confidence function 'mine': cannot import nosuch_gates:conf: ModuleNotFoundError",
        ),
        (  # the deployment names a module:attr directly
            "'nosuch_mod:fn'",
            {},
            "confidence function 'nosuch_mod:fn': cannot import nosuch_mod:fn",
        ),
        ("nosuch_builtin", {}, "confidence function 'nosuch_builtin': not a built-in"),
    ],
)
def test_a_gate_function_that_does_not_import_is_refused_by_the_agent(
    ocr, tmp_path, gate, agent_yaml, reason
) -> None:
    agent = ocr.agent("d1", **agent_yaml)
    file = tmp_path / "deployment.yaml"
    file.write_text(
        f"slots:\n  main:\n    models: [ocr@7, ocr@4]\n    gate: {{function: {gate}, threshold: 0.5}}\n"
    )
    run = ocr.cli("assign", "--deployment", file, "--device", "d1", "--timeout", "20s")
    assert run.code == 1, run
    assert run.out.startswith("d1: refused at load: ") and reason in run.out, run.out
    assert serving(agent) == {}
    good = ocr.cli("assign", "ocr@4", "--device", "d1", "--timeout", "20s")  # still alive
    assert good.code == 0, good
    doc, _ = infer_json(agent, "main", X)
    assert doc["outputs"][0]["data"] == [2.0] * 4
