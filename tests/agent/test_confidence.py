"""The built-in confidence functions on hand-computed values, and loading user functions."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from slimfleet.agent.confidence import (
    BUILTINS,
    check_shape,
    ctc_min_margin,
    ctc_min_prob,
    function_for_shape,
    map_mean_max,
    max_prob,
    resolve_confidence,
)
from slimfleet.agent.errors import ConfigError


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_max_prob_reads_probabilities_as_they_are() -> None:
    probs = np.array([[0.1, 0.7, 0.2]], np.float32)
    assert max_prob({"p": probs}) == pytest.approx(0.7)
    assert max_prob({"p": probs[0]}) == pytest.approx(0.7)


def test_max_prob_applies_softmax_to_logits() -> None:
    logits = np.array([[2.0, 0.0, -1.0]], np.float32)
    assert max_prob({"z": logits}) == pytest.approx(softmax(logits.astype(np.float64)).max())
    # values in [0, 1] that do not sum to 1 are not probabilities either
    scores = np.array([[0.9, 0.8, 0.7]], np.float32)
    assert max_prob({"z": scores}) == pytest.approx(softmax(scores.astype(np.float64)).max())


def test_max_prob_of_a_batch_is_its_least_sure_row() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4]], np.float32)
    assert max_prob({"p": probs}) == pytest.approx(0.6)


def test_max_prob_reads_the_first_float_output() -> None:
    outputs = {"label": np.array([1], np.int64), "p": np.array([[0.2, 0.8]], np.float32)}
    assert max_prob(outputs) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no floating-point output"):
        max_prob({"label": np.array([1], np.int64)})


@pytest.mark.parametrize("layout", ["TC", "T1C", "1TC"])
def test_ctc_min_prob_is_the_least_sure_step(layout: str) -> None:
    logits = np.array([[5.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 8.0]], np.float32)
    expected = softmax(logits.astype(np.float64)).max(-1).min()
    shaped = {"TC": logits, "T1C": logits[:, None], "1TC": logits[None]}[layout]
    assert ctc_min_prob({"o": shaped}) == pytest.approx(expected)
    probs = softmax(logits.astype(np.float64)).astype(np.float32)
    assert ctc_min_prob({"o": probs}) == pytest.approx(expected, rel=1e-5)


def test_ctc_min_margin_is_the_smallest_top1_top2_gap() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.45, 0.4, 0.15], [0.1, 0.1, 0.8]], np.float32)
    assert ctc_min_margin({"o": probs[:, None]}) == pytest.approx(0.05, abs=1e-6)


def test_ctc_functions_reject_a_batch_of_sequences() -> None:
    with pytest.raises(ValueError, match=r"\[T, 1, C\]"):
        ctc_min_prob({"o": np.zeros((4, 3, 5), np.float32)})


def test_map_mean_max_on_probabilities_and_logits() -> None:
    probs = np.array([[[[0.9, 0.2], [0.5, 1.0]]]], np.float32)
    assert map_mean_max({"m": probs}) == pytest.approx((0.9 + 0.8 + 0.5 + 1.0) / 4)
    logits = np.array([[-2.0, 0.0, 3.0]], np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert map_mean_max({"m": logits}) == pytest.approx(np.maximum(p, 1 - p).mean())
    assert map_mean_max({"m": np.array([[-800.0, 800.0]], np.float32)}) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_nan_means_cannot_tell(name: str) -> None:
    array = np.full((3, 1, 4), 0.25, np.float32)
    array[1, 0, 2] = np.nan
    assert math.isnan(BUILTINS[name]({"o": array}))


@pytest.mark.parametrize("name", ["max_prob", "ctc_min_prob", "ctc_min_margin"])
def test_a_single_class_is_an_error_not_a_confidence(name: str) -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        BUILTINS[name]({"o": np.ones((3, 1), np.float32)})


def test_an_empty_sequence_is_an_error_not_a_confidence() -> None:
    with pytest.raises(ValueError, match=r"no scores to judge: the output has shape \[0, 5\]"):
        ctc_min_prob({"o": np.zeros((0, 1, 5), np.float32)})


def test_function_for_shape_decides_only_unambiguous_shapes() -> None:
    assert function_for_shape([1, 10]) == "max_prob"
    assert function_for_shape(["T", 1, 8210]) == "ctc_min_prob"
    assert function_for_shape([1, 40, 37]) == "ctc_min_prob"
    assert function_for_shape([1, 1, 320, 320]) == "map_mean_max"
    assert function_for_shape(["batch", 10]) is None
    assert function_for_shape([1, "seqlen"]) == "max_prob"  # what the shape says
    assert function_for_shape([]) is None


def test_check_shape_rejects_what_a_builtin_cannot_read() -> None:
    assert check_shape("ctc_min_prob", ["T", 1, 37]) is None
    assert check_shape("ctc_min_prob", [1, "seqlen"]) is None  # cannot tell: passes
    assert "sequence scores" in check_shape("ctc_min_prob", [8, 40, 37])
    assert "sequence scores" in check_shape("ctc_min_margin", [1, 2, 3, 4])
    assert "class scores" in check_shape("max_prob", [8, 40, 37])
    assert "2 classes" in check_shape("max_prob", [1, 1])
    assert check_shape("map_mean_max", [1, 1, 64, 64]) is None
    assert check_shape("mypkg:fn", [5]) is None


def test_resolve_builtins_and_user_functions(tmp_path: Path, monkeypatch) -> None:
    assert resolve_confidence("ctc_min_prob") is ctc_min_prob
    (tmp_path / "userconf.py").write_text(
        "def sure(outputs):\n    return 0.5\n\nclass Holder:\n    fn = staticmethod(sure)\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userconf", None)
    assert resolve_confidence("userconf:sure")({}) == 0.5
    assert resolve_confidence("userconf:Holder.fn")({}) == 0.5
    assert resolve_confidence("mine", {"mine": "userconf:sure"})({}) == 0.5


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_builtin", "not a built-in"),
        ("nonexistent_module_xyz:fn", "cannot import nonexistent_module_xyz:fn: ModuleNotFound"),
        ("math:no_such_attr", "AttributeError"),
        ("math:pi", "is not callable"),
        ("", "expected a name"),
    ],
)
def test_a_function_that_does_not_resolve_is_one_config_line(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_confidence(name)
    assert "\n" not in str(caught.value)


def test_a_user_module_that_raises_on_import_is_a_config_error(tmp_path: Path, monkeypatch):
    (tmp_path / "brokenconf.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="RuntimeError: boom") as caught:
        resolve_confidence("brokenconf:fn")
    assert "\n" not in str(caught.value)


def test_a_user_module_that_exits_on_import_is_a_config_error(tmp_path, monkeypatch) -> None:
    # SystemExit is not an Exception: it ended the agent (or the calibrating command)
    import sys

    import pytest

    from slimfleet.agent.confidence import resolve_confidence
    from slimfleet.agent.errors import ConfigError

    (tmp_path / "gate_exits.py").write_text("import sys\nsys.exit(4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gate_exits", raising=False)
    with pytest.raises(ConfigError, match="cannot import gate_exits:f: SystemExit: 4"):
        resolve_confidence("gate_exits:f")
