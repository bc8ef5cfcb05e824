"""What a newcomer's first runs of ``slimfleet compress`` found (issue 6, item 6)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from slimfleet.host.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_dash_h_works_for_every_command(slimfleet, command):
    code, stdout, stderr = slimfleet(command, "-h")
    assert code == 0, stderr
    assert stdout.startswith(f"Usage: slimfleet {command}")


def test_dash_h_works_for_the_group(slimfleet):
    code, stdout, _ = slimfleet("-h")
    assert code == 0 and "Commands:" in stdout


def test_an_explicitly_requested_pass_that_skips_exits_2_with_the_reason(
    slimfleet, mlp_case, tmp_path
):
    model, data = mlp_case
    args = ["compress", model, "-o", tmp_path / "out", "--data", data, "--quick"]
    code, _, stderr = slimfleet(*args, "--passes", "fp16,prune[mode=channels]")
    assert code == 2, stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert line == (
        "error: --passes: pass prune was skipped: no Conv node with its weights in an initializer"
    )
    assert not (tmp_path / "out").exists()


def test_off_a_terminal_progress_is_one_line_per_candidate(slimfleet, mlp_case, tmp_path):
    model, data = mlp_case
    args = ["compress", model, "-o", tmp_path / "out", "--data", data, "--quick"]
    code, _, stderr = slimfleet(*args, "--passes", "normalize,simplify")
    assert code == 0, stderr
    progress = [line for line in stderr.splitlines() if line.startswith("[")]
    assert progress == [
        "[0/3] measuring the original",
        "[1/3] normalize > simplify",
        "[2/3] timing 1 finalist(s) against the original, interleaved",
        "[3/3] done",
    ]
    assert "\r" not in stderr  # no progress bar redraws in a log


def test_outdir_that_is_not_an_earlier_output_needs_force(slimfleet, mlp_case, tmp_path):
    model, data = mlp_case
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    args = ["compress", model, "-o", out, "--data", data, "--quick", "--passes", "normalize"]
    code, _, stderr = slimfleet(*args)
    assert code == 2
    assert (
        f"error: output directory {out} is not empty and holds no earlier slimfleet output"
        in stderr
    )
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]
    assert slimfleet(*args, "--force")[0] == 0
    assert (out / "chapter1.tex").read_text() == "years of work"
    assert slimfleet(*args)[0] == 0  # now an earlier output: rewritten without --force


def test_an_empty_output_path_is_refused(slimfleet, mlp_case):
    model, data = mlp_case
    code, _, stderr = slimfleet("compress", model, "-o", "", "--data", data)
    assert code == 2 and "an empty path (use -o . for the current directory)" in stderr


def test_the_models_own_directory_is_not_an_output_without_force(slimfleet, mlp_case, tmp_path):
    # it was exempt from the check, and compress replaced the model, the user's samples
    # and their notes beside it
    model, data = mlp_case
    home = tmp_path / "work"
    home.mkdir()
    for source, name in ((model, "model.onnx"), (data, "sample.npz")):
        (home / name).write_bytes(Path(source).read_bytes())
    (home / "report.html").write_text("my notes")
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    args = ["compress", home / "model.onnx", "-o", home, "--data", home / "sample.npz"]
    code, _, stderr = slimfleet(*args, "--quick", "--passes", "normalize")
    assert code == 2 and f"output directory {home} is not empty" in stderr
    assert {p.name: p.read_bytes() for p in home.iterdir()} == before


def test_metric_override_and_a_bad_metric(slimfleet, mlp_case, tmp_path):
    model, data = mlp_case
    args = ["compress", model, "-o", tmp_path / "out", "--data", data, "--quick"]
    code, stdout, stderr = slimfleet(*args, "--passes", "normalize", "--metric", "y=cosine")
    assert code == 0, stderr
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    figures = doc["candidates"][0]["fidelity"]["outputs"]["y"]
    assert (figures["metric"], figures["detected"], figures["samples"]) == ("cosine", False, 20)
    assert "judged output y: cosine 1.0000 over 20 samples" in stdout
    code, _, stderr = slimfleet(*args, "--metric", "nope=top1")
    assert code == 2 and "--metric 'nope': the model has no such output" in stderr


def test_an_interval_that_holds_the_budget_is_said_with_the_samples_to_settle_it(
    slimfleet, mlp_case, tmp_path
):
    """20 evaluation samples all agreeing: Wilson's lower bound is 0.84, under 0.9."""
    model, data = mlp_case
    args = ["compress", model, "-o", tmp_path / "out", "--data", data, "--quick"]
    code, _, stderr = slimfleet(*args, "--passes", "fp16", "--fidelity", "0.9")
    assert code == 0, stderr
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    (undecided,) = doc["candidates"][1]["undecided"]
    assert undecided["output"] == "y" and undecided["samples"] == 20
    assert undecided["samples_to_settle"] == 35  # Wilson(35 of 35) first clears 0.9
    if doc["choice"]["candidate"] == 1:  # fp16 won the race: its own sentence
        assert "note: #1 (chosen): output y: the 95% interval [0.8389, 1.0000]" in stderr
        assert "so 20 samples cannot tell; about 35 samples would settle it" in stderr
    else:  # the original was kept: fp16 is counted among the undecided
        assert "note: 1 other candidate(s) (#1) have an interval holding the budget" in stderr
    assert "Undecided: " in (tmp_path / "out" / "report.html").read_text()


def test_sympy_is_in_the_host_extra():
    """onnxruntime's quant_pre_process and symbolic shape inference import it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("sympy") for dep in extras["host"])
