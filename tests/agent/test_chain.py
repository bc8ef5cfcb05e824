"""The fallback chain on real onnxruntime sessions of small models built with onnx.helper."""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimfleet.agent.chain import Chain, ChainAnswer, SessionTier, TierTimeout, chain_for_slot
from slimfleet.agent.confidence import max_prob
from slimfleet.agent.deployment import Gate, SlotSpec
from slimfleet.agent.errors import ConfigError
from slimfleet.agent.inference import FeedError, InferenceError, NoModelError
from slimfleet.agent.runtime import open_session
from slimfleet.agent.wire import ModelRef

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
P = helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 4])
SURE = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)  # x within the gather table: runs
OUT_OF_TABLE = np.array([[3.0, 0.0, 0.0, 0.0]], np.float32)  # makes the gather tier fail


def softmax_model(sharpness: float, gather: bool = False) -> onnx.ModelProto:
    """p = softmax(sharpness * x): the sharper, the surer. With ``gather``, x also indexes
    a 2-entry table first, so x outside [0, 2) fails in onnxruntime at run time."""
    inits = [numpy_helper.from_array(np.array([sharpness], np.float32), "k")]
    nodes = [helper.make_node("Mul", ["x", "k"], ["z"])]
    if gather:
        inits.append(numpy_helper.from_array(np.zeros(2, np.float32), "table"))
        nodes = [
            helper.make_node("Cast", ["x"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["g"]),
            helper.make_node("Add", ["x", "g"], ["xg"]),
            helper.make_node("Mul", ["xg", "k"], ["z"]),
        ]
    nodes.append(helper.make_node("Softmax", ["z"], ["p"], axis=-1))
    model = helper.make_model(
        helper.make_graph(nodes, "softmax", [X], [P], inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    return model


class Counted(SessionTier):
    """A session tier that counts its runs (to see which tiers a request reached)."""

    def __init__(self, label: str, session) -> None:  # type: ignore[no-untyped-def]
        super().__init__(label, session)
        self.runs = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        return super().run(feeds)


@pytest.fixture
def tier(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(label: str, sharpness: float, gather: bool = False) -> Counted:
        path = models.save(softmax_model(sharpness, gather), tmp_path / f"{label}.onnx")
        return Counted(label, open_session(path))

    return make


def sure_of(sharpness: float) -> float:
    return float(1 / (1 + 3 * np.exp(-sharpness)))  # max softmax of sharpness * SURE


GATE = Gate("max_prob", 0.9)  # weak (sharpness 1) is 0.475 sure, strong (10) 0.99993


def test_a_confident_first_tier_answers_alone(tier) -> None:  # type: ignore[no-untyped-def]
    first, second = tier("int8@2", 10.0), tier("fp32@1", 20.0)
    answer = Chain([first, second], GATE, max_prob).run({"x": SURE})
    assert (answer.tier_index, answer.label, answer.escalations) == (0, "int8@2", [])
    assert answer.outputs["p"].max() == pytest.approx(sure_of(10.0), rel=1e-5)
    assert second.runs == 0
    assert [label for label, _ in answer.tier_seconds] == ["int8@2"]


def test_low_confidence_escalates_with_the_measured_value(tier) -> None:  # type: ignore[no-untyped-def]
    first, second = tier("int8@2", 1.0), tier("fp32@1", 10.0)
    answer = Chain([first, second], GATE, max_prob).run({"x": SURE})
    assert (answer.tier_index, answer.label) == (1, "fp32@1")
    assert answer.escalations == [("int8@2", f"low confidence {sure_of(1.0):.4g} < 0.9")]
    assert answer.outputs["p"].max() == pytest.approx(sure_of(10.0), rel=1e-5)
    assert (first.runs, second.runs) == (1, 1)


def test_the_last_tier_answers_even_when_unconfident(tier) -> None:  # type: ignore[no-untyped-def]
    chain = Chain([tier("a@1", 1.0), tier("b@1", 2.0)], GATE, max_prob)
    answer = chain.run({"x": SURE})
    assert answer.label == "b@1"
    assert [label for label, _ in answer.escalations] == ["a@1"]


def test_a_missing_tier_is_skipped_by_name(tier) -> None:  # type: ignore[no-untyped-def]
    second = tier("fp32@1", 10.0)
    chain = Chain([None, second], GATE, max_prob, labels=["int8@2", "fp32@1"])
    answer = chain.run({"x": SURE})
    assert (answer.tier_index, answer.escalations) == (1, [("int8@2", "not loaded")])
    unnamed = Chain([None, second], GATE, max_prob).run({"x": SURE})
    assert unnamed.escalations == [("tier 1", "not loaded")]


def test_a_failing_tier_escalates_and_all_failing_names_each(tier) -> None:  # type: ignore[no-untyped-def]
    broken, strong = tier("int8@2", 10.0, gather=True), tier("fp32@1", 10.0)
    answer = Chain([broken, strong], GATE, max_prob).run({"x": OUT_OF_TABLE})
    assert answer.label == "fp32@1"
    ((label, reason),) = answer.escalations
    assert label == "int8@2" and reason.startswith("failed: int8@2: ") and "\n" not in reason
    # the same tier is fine on feeds inside its table
    assert Chain([broken, strong], GATE, max_prob).run({"x": SURE}).label == "int8@2"
    both = Chain([broken, tier("b@1", 1.0, gather=True), None], GATE, max_prob)
    with pytest.raises(
        InferenceError,
        match=r"every tier failed: int8@2: failed: .*; b@1: "
        r"failed: .*; tier 3: not loaded",
    ) as caught:
        both.run({"x": OUT_OF_TABLE})
    assert "\n" not in str(caught.value)


def test_an_unconfident_answer_beats_a_later_failure(tier) -> None:  # type: ignore[no-untyped-def]
    weak, broken = tier("int8@2", 1.0), tier("fp32@1", 10.0, gather=True)
    answer = Chain([weak, broken], GATE, max_prob).run({"x": OUT_OF_TABLE})
    assert (answer.tier_index, answer.label) == (0, "int8@2")
    assert [label for label, _ in answer.escalations] == ["fp32@1"]
    assert answer.escalations[0][1].startswith("failed: ")
    assert [label for label, _ in answer.tier_seconds] == ["int8@2", "fp32@1"]


def test_a_feed_error_is_raised_at_once(tier) -> None:  # type: ignore[no-untyped-def]
    first, second = tier("int8@2", 1.0), tier("fp32@1", 10.0)
    chain = Chain([first, second], GATE, max_prob)
    with pytest.raises(FeedError):
        chain.run({"wrong_name": SURE})
    with pytest.raises(FeedError):
        chain.run({"x": SURE.astype(np.float64)})
    assert second.runs == 0


@pytest.mark.parametrize(
    ("confidence", "reason"),
    [
        (lambda outputs: math.nan, "confidence is NaN"),
        (lambda outputs: 1 / 0, "failed: confidence max_prob: ZeroDivisionError: division by zero"),
    ],
)
def test_an_unjudgeable_answer_escalates(tier, confidence, reason) -> None:  # type: ignore[no-untyped-def]
    answer = Chain([tier("a@1", 10.0), tier("b@1", 10.0)], GATE, confidence).run({"x": SURE})
    assert answer.escalations == [("a@1", reason)]


def test_without_a_gate_only_failures_escalate(tier) -> None:  # type: ignore[no-untyped-def]
    answer = Chain([tier("a@1", 0.1), tier("b@1", 10.0)], None, None).run({"x": SURE})
    assert (answer.label, answer.escalations) == ("a@1", [])


def test_a_gate_alone_resolves_its_function(tier, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    chain = Chain([tier("a@1", 1.0), tier("b@1", 10.0)], Gate("ctc_min_prob", 0.9), None)
    assert chain.run({"x": SURE}).label == "b@1"
    (tmp_path / "never_sure.py").write_text("def conf(outputs):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("never_sure", None)
    user = Chain([tier("c@1", 10.0), tier("d@1", 10.0)], Gate("never_sure:conf", 0.5), None)
    assert user.run({"x": SURE}).escalations == [("c@1", "low confidence 0 < 0.5")]
    with pytest.raises(ConfigError, match="no_such_module"):
        Chain([tier("e@1", 1.0)], Gate("no_such_module:conf", 0.5), None)


class Remote:
    """A remote tier stand-in for the chain's rules (the real one: test_remote.py)."""

    label = "remote"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        return {"p": np.full((1, 4), 0.25, np.float32)}


def test_the_remote_answers_last_and_its_timeout_is_named(tier) -> None:  # type: ignore[no-untyped-def]
    local = tier("a@1", 1.0)
    answer = Chain([local], GATE, max_prob, remote=Remote()).run({"x": SURE})
    assert (answer.tier_index, answer.label) == (1, "remote")  # unconfident but last
    timed_out = Chain([local], GATE, max_prob, remote=Remote(TierTimeout("2 s"))).run({"x": SURE})
    assert timed_out.label == "a@1"
    assert timed_out.escalations == [("remote", "timeout")]
    with pytest.raises(InferenceError, match="a@1: not loaded; remote: timeout"):
        Chain([None], GATE, max_prob, remote=Remote(TierTimeout("x")), labels=["a@1"]).run(
            {"x": SURE}
        )


def test_many_threads_get_their_own_answers(tier) -> None:  # type: ignore[no-untyped-def]
    chain = Chain(
        [tier("a@1", 3.0), tier("b@1", 10.0)], Gate("max_prob", sure_of(3.0) + 1e-3), max_prob
    )
    rng = np.random.default_rng(0)
    feeds = [rng.uniform(0, 1.9, (1, 4)).astype(np.float32) for _ in range(64)]
    expected = [chain.run({"x": f}) for f in feeds]
    got: list[list[ChainAnswer]] = [[] for _ in range(8)]

    def work(slot: int) -> None:
        got[slot] = [chain.run({"x": f}) for f in feeds]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({a.label for a in expected}) == 2  # the inputs exercise both tiers
    for answers in got:
        for want, have in zip(expected, answers, strict=True):
            assert (have.label, have.escalations) == (want.label, want.escalations)
            np.testing.assert_array_equal(have.outputs["p"], want.outputs["p"])


def test_no_tier_loaded_is_no_model_not_a_model_failure() -> None:
    with pytest.raises(
        NoModelError,
        match=r"no tier of the chain is loaded \(a@1: not loaded; "
        r"tier 2: not loaded\)",
    ) as caught:
        Chain([None, None], GATE, max_prob, labels=["a@1", "tier 2"]).run({"x": SURE})
    assert not isinstance(caught.value, InferenceError)


def test_a_chain_needs_a_tier() -> None:
    with pytest.raises(ValueError):
        Chain([], None, None)


def test_chain_for_slot_follows_the_spec(tier, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    int8, fp32 = ModelRef("ocr", 7), ModelRef("ocr", 4)
    (tmp_path / "slot_gates.py").write_text("def strict(outputs):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("slot_gates", None)
    spec = SlotSpec((int8, fp32), Gate("strict", 0.9))
    loaded = {int8: tier("ocr@7", 10.0), fp32: tier("ocr@4", 10.0)}
    chain = chain_for_slot(spec, loaded, user_functions={"strict": "slot_gates:strict"})
    answer = chain.run({"x": SURE})
    assert answer.label == "ocr@4"
    assert answer.escalations == [("ocr@7", "low confidence 0.5 < 0.9")]
    skipped = chain_for_slot(SlotSpec((int8, fp32)), {fp32: loaded[fp32]}).run({"x": SURE})
    assert skipped.escalations == [("ocr@7", "not loaded")]
    with pytest.raises(ConfigError, match="'strict'"):
        chain_for_slot(spec, loaded)  # the short name means nothing without agent.yaml
