"""``slimfleet chain calibrate``: the replayed chain on hand-computed numbers, and the
command on two real classifier tiers, cross-checked against the agent's Chain."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import models
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from slimfleet.agent.chain import Chain, SessionTier
from slimfleet.agent.confidence import max_prob
from slimfleet.agent.deployment import Gate
from slimfleet.agent.runtime import open_session
from slimfleet.host.chaincal import Measured, Point, budget_lines, curve, parse_budget, pick
from slimfleet.host.cli import main

NAN = float("nan")


def test_curve_replays_the_chain_at_every_threshold() -> None:
    measured = Measured(
        confidence=np.array([[0.9, 0.5, 0.7, NAN], [NAN] * 4]),
        agreement=np.array([[1.0, 0.0, 1.0, 1.0], [1.0] * 4]),
        seconds=np.array([[1.0] * 4, [4.0] * 4]),
    )
    points = curve(measured)
    assert [(p.escalation, p.agreement, p.latency_ratio) for p in points] == [
        (0.25, 0.75, 0.5),  # t=0.5: only the NaN escalates
        (0.5, 1.0, 0.75),  # t=0.7
        (0.75, 1.0, 1.0),  # t=0.9
        (1.0, 1.0, 1.25),  # above all: everything escalates, paying both tiers
    ]
    assert [p.threshold for p in points[:3]] == [0.5, 0.7, 0.9] and points[3].threshold > 0.9
    assert pick(points, 0.5).threshold == 0.7  # the highest agreement within the budget
    assert pick(points, 0.75).threshold == 0.9  # equal agreement: the budget is spent
    assert pick(points, 0.3).threshold == 0.5
    assert pick(points, 0.1) is None
    assert [b for b, _ in budget_lines(points)] == [0.25, 0.3, 0.35, 0.4, 0.45, 0.5]


def test_three_tiers_answer_with_the_first_confident_one() -> None:
    measured = Measured(
        confidence=np.array([[0.2, 0.9], [0.8, 0.1], [NAN, NAN]]),
        agreement=np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
        seconds=np.array([[1.0, 1.0], [2.0, 2.0], [8.0, 8.0]]),
    )
    at = {p.threshold: p for p in curve(measured)}
    # t=0.8: sample 0 -> tier 1 (agrees), sample 1 -> tier 0 (agrees)
    assert at[0.8] == Point(0.8, 0.5, 1.0, (3.0 + 1.0) / 2 / 8)


@pytest.mark.parametrize("text", ["150%", "-1", "abc", "", "nan"])
def test_parse_budget_rejects(text: str) -> None:
    with pytest.raises(Exception, match="--budget"):
        parse_budget(text)


def classifier(weights: np.ndarray) -> onnx.ModelProto:
    """logits = x @ weights, x [1, 8]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture
def tiers(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A weak tier (the strong one's weights, damped and perturbed), the strong tier,
    and 300 samples on which they disagree now and then."""
    rng = np.random.default_rng(3)
    strong = rng.normal(0, 1, (8, 4))
    weak = 0.5 * strong + rng.normal(0, 0.35, (8, 4))
    data = tmp_path / "samples.npz"
    np.savez(data, x=rng.normal(0, 1, (300, 1, 8)).astype(np.float32))
    return (
        models.save(classifier(weak), tmp_path / "weak.onnx"),
        models.save(classifier(strong), tmp_path / "strong.onnx"),
        data,
    )


def slimfleet(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    """Run the command as the console script does; its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["slimfleet", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def calibrate(monkeypatch, capsys, tiers, budget: str, *extra: object):  # type: ignore[no-untyped-def]
    """``chain calibrate WEAK STRONG --data D --function max_prob --budget B *extra``."""
    weak, strong, data = tiers
    args = [weak, strong, "--data", data, "--function", "max_prob", "--budget", budget]
    return slimfleet(monkeypatch, capsys, "chain", "calibrate", *args, *extra)


def test_calibrate_writes_a_gate_the_chain_reproduces(tiers, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    weak, strong, data = tiers
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text(
        "slots:\n  cls:\n    models: [cls@2, cls@1]\n  other:\n    models: [o@1]\n"
    )
    code, out, err = calibrate(
        monkeypatch, capsys, tiers, "25%", "--deployment", deployment, "--slot", "cls", "--json"
    )
    assert code == 0, err
    doc = json.loads(out)
    chosen = doc["chosen"]
    assert doc["samples"] == 300 and doc["agreement_metric"] == "top1"
    assert chosen["escalation"] <= 0.25
    alone = doc["curve"][0]  # budget 0: the weak tier answers everything
    assert alone["escalation"] == 0 and alone["agreement"] < chosen["agreement"] < 1
    written = yaml.safe_load(deployment.read_text())
    assert written["slots"]["cls"]["gate"] == {
        "function": "max_prob",
        "threshold": doc["gate"]["threshold"],
    }
    assert written["slots"]["other"] == {"models": ["o@1"]}
    assert written["slots"]["cls"]["models"] == ["cls@2", "cls@1"]

    # the agent's Chain with that gate escalates and agrees exactly as calibrate said
    chain = Chain(
        [SessionTier("weak", open_session(weak)), SessionTier("strong", open_session(strong))],
        Gate("max_prob", doc["gate"]["threshold"]),
        max_prob,
    )
    reference = SessionTier("strong", open_session(strong))
    escalated = agreed = 0
    for x in np.load(data)["x"]:
        answer = chain.run({"x": x})
        escalated += answer.tier_index > 0
        want = reference.run({"x": x})["logits"].argmax()
        agreed += answer.outputs["logits"].argmax() == want
    assert escalated / 300 == pytest.approx(chosen["escalation"])
    assert agreed / 300 == pytest.approx(chosen["agreement"])


def test_calibrate_prints_the_trade_off_curve(tiers, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    code, out, err = calibrate(monkeypatch, capsys, tiers, "0.1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("300 samples, 2 tiers, max_prob, agreement with strong.onnx by top1")
    rows = [line for line in lines if line.strip().endswith(("x", "<- chosen"))]
    assert rows[0].split()[0] == "0%" and len(rows) >= 3
    assert sum("<- chosen" in line for line in lines) == 1
    assert lines[-1].startswith("gate: {function: max_prob, threshold: ")


def test_without_function_it_is_chosen_by_the_output_shape(tiers, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    weak, strong, data = tiers
    args = ["chain", "calibrate", weak, strong, "--data", data, "--budget", "10%", "--json"]
    code, out, err = slimfleet(monkeypatch, capsys, *args)
    assert code == 0, err
    assert json.loads(out)["gate"]["function"] == "max_prob"  # logits [1, 4]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "150%"], "--budget '150%'"),
        (["--function", "no_such_mod:fn"], "cannot import no_such_mod:fn"),
        (["--function", "softmax_please"], "not a built-in"),
        (["--agree", "text"], "--agree text: output 'logits' does not look like sequence"),
        (["--agree", "bogus"], "--agree 'bogus': unknown kind 'bogus'"),
        (["--data", "missing.npz"], "missing.npz: no such file"),
        (["--slot", "cls"], "--deployment and --slot go together"),
        (
            ["--deployment", "DEPLOY", "--slot", "nope"],
            "no slot 'nope' to set a gate on (slots: cls)",
        ),
        (["--deployment", "DEPLOY", "--slot", "Bad Slot"], "--slot: invalid slot name"),
        (
            ["--deployment", "DEPLOY", "--slot", "cls"],
            "slot 'cls': a gate escalates to a second model or a remote tier",
        ),
        (["ONE"], "give at least two models"),
        (["RENAMED"], "the tiers have different outputs: [['logits'], ['scores']]"),
        (["MISSING"], "no such model file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiers, tmp_path, monkeypatch, capsys, args, message):  # type: ignore[no-untyped-def]
    weak, strong, data = tiers
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("slots:\n  cls:\n    models: [cls@1]\n")
    base = {"--data": str(data), "--function": "max_prob", "--budget": "20%"}
    models_given = [weak, strong]
    extra = []
    i = 0
    while i < len(args):
        if args[i] == "ONE":
            models_given, i = [weak], i + 1
        elif args[i] == "RENAMED":
            renamed = onnx.load(str(strong))
            renamed.graph.node[0].output[0] = renamed.graph.output[0].name = "scores"
            models_given, i = [weak, models.save(renamed, tmp_path / "renamed.onnx")], i + 1
        elif args[i] == "MISSING":
            models_given, i = [weak, tmp_path / "nope.onnx"], i + 1
        elif args[i] in base:
            base[args[i]], i = args[i + 1], i + 2
        else:
            extra.append(str(deployment) if args[i] == "DEPLOY" else args[i])
            i += 1
    flat = [item for pair in base.items() for item in pair]
    before = deployment.read_text()
    code, out, err = slimfleet(
        monkeypatch, capsys, "chain", "calibrate", *models_given, *flat, *extra
    )
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert deployment.read_text() == before


def test_agreement_is_judged_as_the_search_judges_it(tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    """A tagger reading token ids: its [1, T, tags] scores look like CTC sequence scores,
    and the search judges them step by step (CTC would hide a tag moved between equal
    neighbours); chain calibrate said ctc until it read the signature too."""
    rng = np.random.default_rng(4)
    strong = models.token_tagger(tags=6, seed=1)
    weak = models.token_tagger(tags=6, seed=1)
    head = next(t for t in weak.graph.initializer if t.name == "head")
    noisy = numpy_helper.to_array(head) + rng.normal(0, 0.5, (16, 6)).astype(np.float32)
    head.CopyFrom(numpy_helper.from_array(noisy, "head"))
    data = tmp_path / "ids.npz"
    np.savez(data, ids=rng.integers(0, 50, (60, 1, 12)))
    code, out, err = slimfleet(
        monkeypatch,
        capsys,
        "chain",
        "calibrate",
        models.save(weak, tmp_path / "weak.onnx"),
        models.save(strong, tmp_path / "strong.onnx"),
        "--data",
        data,
        "--function",
        "max_prob",
        "--budget",
        "50%",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["agreement_metric"].startswith("steps")
