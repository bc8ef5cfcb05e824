"""Task-level fidelity: metric detection, scoring, intervals, --metric parsing."""

from __future__ import annotations

import numpy as np
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import fidelity, intervals, metricdetection
from slimfleet.host.compress.fidelity import compare
from slimfleet.host.compress.metricdetection import detect
from slimfleet.host.compress.metricspec import MetricSpec, parse_metric

RNG = np.random.default_rng(3)


def _outs(**arrays: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in arrays.items()}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "kind"),
    [
        (RNG.normal(size=(1, 10)).astype(np.float32), "top1"),  # narrow logits
        (_softmax(RNG.normal(size=(1, 214))), "top1"),  # wide probabilities (magika)
        (RNG.normal(size=(1, 384)).astype(np.float32), "cosine"),  # a sentence embedding
        (RNG.normal(size=(1, 1, 1, 96)).astype(np.float32), "cosine"),  # wake-word features
        (RNG.normal(size=(20, 1, 37)).astype(np.float32), "ctc"),  # CRNN, time-major
        (RNG.normal(size=(1, 50, 15)).astype(np.float32), "ctc"),  # batch-major sequence
        (RNG.normal(size=(1, 48, 2)).astype(np.float32), "steps"),  # a segmenter's 2 tags
        (RNG.uniform(0, 112, size=(1, 68, 2)).astype(np.float32), "cosine"),  # landmarks
        (RNG.random((1, 1, 32, 32)).astype(np.float32), "iou"),  # a saliency mask
        (RNG.normal(size=(1, 22, 2100)).astype(np.float32), "cosine"),  # YOLO boxes
        (np.array([[0.93]], np.float32), "binary"),  # one probability
        (np.array([[3, 1, 2]], np.int64), "exact"),
        (np.array([True, False]), "exact"),
    ],
)
def test_the_metric_is_detected_from_shape_and_values(array, kind):
    assert detect([array]).kind == kind


def test_wide_peaked_logits_are_class_scores():
    logits = RNG.normal(size=(4, 1000)).astype(np.float32)
    logits[np.arange(4), [3, 70, 500, 999]] += 12  # a confident classifier's peak
    assert detect([logits]).kind == "top1"


def _anchors(rows: int = 3549) -> np.ndarray:
    """A YOLO-style detector's [1, anchors, 6] rows: box centre and size in pixels,
    objectness and one class score in [0, 1] (ddddocr's common_det layout)."""
    boxes = RNG.uniform(0, 416, size=(1, rows, 4))
    scores = RNG.uniform(0, 0.02, size=(1, rows, 2))
    return np.concatenate([boxes, scores], -1).astype(np.float32)


def test_a_detectors_anchor_rows_are_not_ctc_text():
    """Box coordinates and objectness vary on scales 10^4 apart: not a class axis, so
    the detector is judged by cosine, not by 'decoded text' of argmax over x, y, w, h."""
    assert detect([_anchors()]).kind == "cosine"
    # CTC logits whose vocabulary columns vary on comparable scales stay CTC
    logits = RNG.normal(size=(1, 3549, 6)) * RNG.uniform(0.5, 3, size=6)
    assert detect([logits.astype(np.float32)]).kind == "ctc"


def test_a_taggers_scores_with_never_predicted_tags_are_a_sequence():
    """lac's [1, T, 59] emissions: 10 tags the model never predicts sit at -13.7 with a
    spread of 1e-4 (the others vary by 0.3-2.1). They once made it 'not a class axis'
    and the tagger was judged by cosine (0.99996 while 1.8% of its tags changed)."""
    emissions = RNG.normal(size=(1, 19, 59)) * RNG.uniform(0.3, 2.1, size=59)
    emissions[..., 49:] = -13.7 + RNG.normal(scale=1e-4, size=(1, 19, 10))
    assert detect([emissions.astype(np.float32)]).kind == "ctc"
    assert detect([_anchors()]).kind == "cosine"  # its small scores vary: still not classes


def test_ctc_layout_is_detected():
    assert detect([RNG.normal(size=(20, 1, 37))]).option("batch_axis") == 1
    assert detect([RNG.normal(size=(1, 20, 37))]).option("batch_axis") == 0


# -- scoring -------------------------------------------------------------------------------


def _sequence(*classes: int, width: int = 4) -> np.ndarray:
    """[T, 1, C] one-hot scores for ``classes``."""
    return np.eye(width, dtype=np.float32)[list(classes)][:, None]


def test_ctc_judges_the_decoded_text_and_reports_step_agreement():
    ref = [_outs(logits=_sequence(1, 1, 0, 2, 2)) for _ in range(4)]
    got = [_outs(logits=_sequence(1, 1, 0, 2, 2)) for _ in range(4)]
    got[0] = _outs(logits=_sequence(1, 1, 1, 2, 2))  # same text "1 2", one step differs
    got[1] = _outs(logits=_sequence(1, 0, 1, 2, 2))  # text "1 1 2": wrong
    (out,) = compare(ref, got).outputs
    assert out.metric == "ctc:blank=0,batch_axis=1"
    assert out.score == pytest.approx(3 / 4) and out.samples == 4
    assert out.step_agreement == pytest.approx(1 - 3 / 20)
    assert out.interval_method == "wilson"
    assert out.interval == pytest.approx(intervals.wilson(3, 4))


def test_ctc_blank_option_changes_the_decoding():
    ref, got = [_outs(y=_sequence(3, 1, 3, 2))], [_outs(y=_sequence(3, 1, 1, 2))]
    blank0 = compare(ref, got, {"y": parse_metric("y=ctc:blank=0,batch_axis=1")[1]})
    blank3 = compare(ref, got, {"y": parse_metric("y=ctc:blank=3,batch_axis=1")[1]})
    assert blank0.score == 0.0  # 3 1 3 2 vs 3 1 2
    assert blank3.score == 1.0  # both decode to 1 2


def test_ctc_with_labels_compares_the_texts_they_spell(tmp_path):
    # ddddocr's charset holds 'c' and 'C' as different classes: with case=insensitive a
    # flip between them keeps the text; class ids that spell the same text agree anyway
    labels = tmp_path / "charset.json"
    labels.write_text('["", "c", "C", "x", "x"]')
    ref = [_outs(y=_sequence(1, 0, 3, width=5)), _outs(y=_sequence(1, 0, 3, width=5))]
    got = [_outs(y=_sequence(2, 0, 3, width=5)), _outs(y=_sequence(1, 0, 4, width=5))]

    def score(metric: str) -> float:
        return compare(ref, got, {"y": parse_metric(f"y={metric}")[1]}).score

    assert score("ctc:batch_axis=1") == 0.0  # ids: [1, 3] vs [2, 3] and [1, 4]
    assert score(f"ctc:batch_axis=1,labels={labels}") == 0.5  # "cx" vs "Cx", "cx"
    assert score(f"ctc:batch_axis=1,labels={labels},case=insensitive") == 1.0


def test_a_labels_file_is_a_line_per_class(tmp_path):
    labels = tmp_path / "keys.txt"
    labels.write_text("\na\nA\n")
    spec = parse_metric(f"y=ctc:labels={labels},case=insensitive,batch_axis=1")[1]
    ref, got = [_outs(y=_sequence(1, 0, width=3))], [_outs(y=_sequence(2, 0, width=3))]
    assert compare(ref, got, {"y": spec}).score == 1.0
    with pytest.raises(InputError, match="the labels file names 3 classes, the output has 4"):
        metricdetection.metric_specs([_outs(y=np.zeros((5, 1, 4)))], {"y": spec})


def test_top1_counts_rows_over_samples():
    ref = [_outs(y=np.eye(4, dtype=np.float32)) for _ in range(2)]
    got = [_outs(y=np.eye(4, dtype=np.float32)) for _ in range(2)]
    got[1]["y"][0] = [0, 0, 0, 5]
    (out,) = compare(ref, got).outputs
    assert (out.metric, out.samples, out.score) == ("top1", 8, pytest.approx(7 / 8))


def test_iou_of_thresholded_maps():
    ref = np.zeros((1, 1, 10, 10), np.float32)
    ref[..., :5, :] = 0.9  # 50 pixels
    got = ref.copy()
    got[..., 5, :] = 0.8  # 10 more
    (out,) = compare([_outs(m=ref), _outs(m=ref)], [_outs(m=got), _outs(m=ref)]).outputs
    assert out.metric == "iou:threshold=0.5"
    assert out.score == pytest.approx((50 / 60 + 1) / 2)
    assert out.interval_method == "bootstrap"


def test_embeddings_by_cosine_with_a_bootstrap_interval():
    ref = [_outs(e=RNG.normal(size=(1, 384)).astype(np.float32)) for _ in range(30)]
    got = [_outs(e=r["e"] + RNG.normal(0, 0.05, (1, 384)).astype(np.float32)) for r in ref]
    (out,) = compare(ref, got).outputs
    assert out.metric == "cosine" and out.samples == 30
    low, high = out.interval
    assert low < out.score < high and low > 0.99 and high <= 1.0


def test_a_scaled_output_is_not_the_same_output():
    """Cosine alone scores y * 0.65 (an fp16 weight clamped at 65504) and a scalar of the
    same sign as 1.0; the score is cosine times the ratio of the norms."""
    ref = [_outs(e=RNG.normal(size=(1, 384)).astype(np.float32)) for _ in range(5)]
    (out,) = compare(ref, [_outs(e=r["e"] * 0.65) for r in ref]).outputs
    assert out.metric == "cosine" and out.score == pytest.approx(0.65)
    scalars = [_outs(s=np.float32(v)) for v in (2.0, 3.0, 4.0)]
    (out,) = compare(scalars, [_outs(s=r["s"] * 2) for r in scalars]).outputs
    assert out.score == pytest.approx(0.5)
    (out,) = compare(ref, ref).outputs
    assert out.score == pytest.approx(1.0)


@pytest.mark.parametrize(
    "values",
    [np.zeros((1, 0, 8), np.float32), np.full((1, 8), np.nan, np.float32), np.zeros((0,), int)],
)
def test_an_output_no_sample_gives_a_value_is_bad_data_not_a_perfect_score(values):
    """Empty tensors (a zero-sized dimension in the data) or all NaN: nothing to compare.
    The search's metrics refuse it; compared alone (chain calibrate, one sample at a
    time) such a sample leaves the output out rather than scoring it 1.0."""
    ref = [_outs(y=values, ids=np.array([[1, 2]])) for _ in range(3)]
    with pytest.raises(InputError, match="output 'y': .*no value to compare on any sample"):
        metricdetection.metric_specs(ref)
    judged = compare(ref, ref, {"y": detect([values]), "ids": MetricSpec("exact")})
    assert [o.name for o in judged.outputs] == ["ids"]


def test_samples_and_rows_the_original_scores_nan_in_judge_nothing():
    good = RNG.normal(size=(2, 10)).astype(np.float32)
    flipped = good.copy()
    flipped[1] = -flipped[1]
    nan_row = good.copy()
    nan_row[1] = np.nan
    ref = [_outs(y=good), _outs(y=nan_row), _outs(y=np.full((2, 10), np.nan, np.float32))]
    got = [_outs(y=good), _outs(y=flipped), _outs(y=good)]
    (out,) = compare(ref, got, {"y": MetricSpec("top1", given=True)}).outputs
    assert (out.score, out.samples) == (1.0, 3)  # two rows of sample 0, one of sample 1


def test_integer_outputs_match_exactly_per_sample():
    ref = [_outs(ids=np.array([[1, 2, 3, 4]])), _outs(ids=np.array([[5, 6, 7, 8]]))]
    got = [_outs(ids=np.array([[1, 2, 0, 4]])), _outs(ids=np.array([[5, 6, 7, 8]]))]
    (out,) = compare(ref, got).outputs
    assert (out.metric, out.score, out.samples) == ("exact", 0.5, 2)


def test_an_ignored_output_is_not_judged():
    ids = np.array([[1, 2]])
    ref = [_outs(state=np.ones((1, 25), np.float32), ids=ids)]
    got = [_outs(state=np.zeros((1, 25), np.float32), ids=ids)]
    specs = metricdetection.metric_specs(ref, {"state": MetricSpec("ignore", given=True)})
    result = compare(ref, got, specs)
    assert [o.name for o in result.outputs] == ["ids"] and result.score == 1.0


def test_outputs_that_are_all_ignored_judge_nothing_and_are_refused():
    """Any candidate would score 1.0: strings slimfleet cannot compare, or --metric."""
    ref = [_outs(state=np.ones((1, 25), np.float32), label=np.array(["cat"]))]
    with pytest.raises(InputError, match="no output can judge a candidate: 'state', 'label'"):
        metricdetection.metric_specs(ref, {"state": MetricSpec("ignore", given=True)})


def test_wrong_shape_is_a_problem():
    result = compare([_outs(y=np.zeros((1, 10)))], [_outs(y=np.zeros((1, 9)))])
    assert result.problem == "output 'y' has shape [1, 9] where the original has [1, 10] (sample 0)"
    assert result.score == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_a_problem(bad):
    got = np.ones((1, 10), np.float32)
    got[0, 3] = bad
    result = compare([_outs(y=np.ones((1, 10), np.float32))], [_outs(y=got)])
    assert result.problem == "output 'y' contains NaN or Inf (sample 0)"


def test_missing_output_is_a_problem():
    assert compare([_outs(y=np.ones(3))], [_outs(z=np.ones(3))]).problem == "output 'y' is missing"


def test_the_score_is_the_worst_output():
    ref = _outs(a=np.eye(3, dtype=np.float32), b=np.ones((1, 2, 8, 8), np.float32) * 3)
    got = _outs(a=np.eye(3, dtype=np.float32), b=-np.ones((1, 2, 8, 8), np.float32) * 3)
    result = compare([ref], [got])
    assert [o.score for o in result.outputs] == [1.0, pytest.approx(-1.0)]
    assert result.worst().name == "b"


# -- intervals -----------------------------------------------------------------------------


def test_wilson_interval_matches_the_textbook():
    low, high = intervals.wilson(98, 100)
    assert low == pytest.approx(0.9300, abs=1e-4) and high == pytest.approx(0.9945, abs=1e-4)
    assert intervals.wilson(10, 10)[1] == 1.0


def test_samples_to_settle_a_straddling_proportion():
    out = fidelity.OutputFidelity("y", "top1", 0.995, 200, intervals.wilson(199, 200), "wilson")
    assert fidelity.straddles(out, 0.99)
    needed = fidelity.samples_to_settle(out, 0.99)
    assert needed is not None and needed > 200
    assert intervals.wilson(0.995 * needed, needed)[0] >= 0.99
    assert intervals.wilson(0.995 * (needed - 1), needed - 1)[0] < 0.99


def test_no_amount_of_data_settles_a_score_on_the_budget():
    out = fidelity.OutputFidelity("y", "top1", 0.99, 100, intervals.wilson(99, 100), "wilson")
    assert fidelity.samples_to_settle(out, 0.99) is None


# -- --metric ------------------------------------------------------------------------------


def test_parse_metric():
    name, spec = parse_metric("onnx::Shape_422=cosine")
    assert (name, spec.kind, spec.given) == ("onnx::Shape_422", "cosine", True)
    name, spec = parse_metric("logits=ctc:blank=5")
    assert (name, spec.option("blank"), spec.label()) == ("logits", 5, "ctc:blank=5")
    assert parse_metric("mask=iou:threshold=0.3")[1].option("threshold") == 0.3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("logits", "expected OUTPUT=KIND"),
        ("logits=bleu", "unknown kind 'bleu'"),
        ("logits=ctc:space=1", "ctc takes options blank, batch_axis, labels, case"),
        ("logits=ctc:blank=x", "blank='x' is not a int"),
        ("p=binary:threshold=nan", "threshold=nan: must be a finite number"),
        ("mask=iou:threshold=5", "it must lie between 0 and 1"),
        ("logits=ctc:blank=-1", "blank=-1: must be >= 0"),
        ("logits=ctc:case=lower", "case=lower: must be one of sensitive, insensitive"),
        ("logits=ctc:case=insensitive", "case=insensitive needs labels=FILE"),
        ("logits=ctc:labels=/no/such/file", "cannot read labels file /no/such/file"),
        ("logits=ctc:labels=/dev/zero", "cannot read labels file /dev/zero: not a regular"),
    ],
)
def test_bad_metric_text(text, message):
    with pytest.raises(InputError, match=message):
        parse_metric(text)


@pytest.mark.parametrize(
    ("given", "values", "message"),
    [
        ("y=ctc:blank=10", np.zeros((1, 5, 10)), "blank 10 is not one of the 10 classes"),
        ("y=ctc:batch_axis=2", np.zeros((1, 5, 10)), "with batch_axis 0 or 1"),
        ("y=steps", np.zeros((2, 1, 5, 10)), r"needs \[N, T, C\]"),
        ("y=binary:threshold=0.9", np.full((4, 1), 0.5), "no value of the original's is above"),
        ("y=iou:threshold=0.1", np.full((1, 8, 8), 0.5), "is at or below 0.1"),
    ],
)
def test_a_given_metric_that_cannot_judge_the_outputs_values_is_refused(given, values, message):
    # a threshold no value crosses made every candidate agree (the 99%-pruned model passed)
    name, spec = parse_metric(given)
    with pytest.raises(InputError, match=message):
        metricdetection.metric_specs([_outs(y=values)] * 2, {name: spec})


def test_a_metric_for_an_unknown_output_is_refused():
    with pytest.raises(InputError, match="the model has no such output"):
        metricdetection.metric_specs([_outs(y=np.ones(2))], {"z": MetricSpec("cosine", given=True)})


def test_outputs_shaped_like_inputs_are_state_and_judged_by_cosine():
    signature = {
        "inputs": [
            {"name": "frame", "dtype": "float32", "shape": [1, 12]},
            {"name": "h_in", "dtype": "float32", "shape": [16]},
        ],
        "outputs": [
            {"name": "scores", "dtype": "float32", "shape": [1, 5]},
            {"name": "h_out", "dtype": "float32", "shape": [16]},
        ],
    }
    assert metricdetection.state_outputs(signature) == {"h_out"}
    reference = [_outs(scores=RNG.normal(size=(1, 5)), h_out=RNG.normal(size=16))]
    specs = metricdetection.metric_specs(reference, states={"h_out"})
    assert (specs["scores"].kind, specs["h_out"].kind) == ("top1", "cosine")
    assert metricdetection.metric_specs(reference)["h_out"].kind == "top1"  # what it would be


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'["a", 1]', "a JSON labels file is a list of strings"),
        (b"[1, 2]", "a JSON labels file is a list of strings"),
        (b"[" * 100_000, "is not a JSON list"),
        (b"\xff\xfe", "cannot read labels file"),
        (b"", "names no class"),
    ],
)
def test_a_labels_file_that_cannot_be_one_is_one_line(tmp_path, content, message):
    labels = tmp_path / "labels"
    labels.write_bytes(content)
    with pytest.raises(InputError, match=message):
        parse_metric(f"y=ctc:labels={labels}")


def test_a_given_ctc_metric_takes_the_time_major_layout_from_the_shape():
    # `--metric 387=ctc:blank=0` on a CRNN's [T, 1, C] scores judged each step as a
    # one-character text: 27 "texts" per captcha, and a wrong text counted as 1 of 27
    ref = [_outs(y=_sequence(1, 0, 2, 2)) for _ in range(3)]
    got = [_outs(y=_sequence(1, 0, 2, 2)), _outs(y=_sequence(1, 0, 1, 2))] * 2
    spec = metricdetection.metric_specs(ref, {"y": parse_metric("y=ctc:blank=0")[1]})["y"]
    assert spec.label() == "ctc:blank=0,batch_axis=1"
    out = compare(ref, got[:3], {"y": spec})
    assert (out.score, out.outputs[0].samples) == (pytest.approx(2 / 3), 3)
    explicit = parse_metric("y=ctc:blank=0,batch_axis=0")[1]
    assert metricdetection.metric_specs(ref, {"y": explicit})["y"] == explicit
