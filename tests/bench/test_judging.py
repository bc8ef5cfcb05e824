"""The benchmarks' task metrics on hand-made outputs."""

from __future__ import annotations

import judging
import numpy as np
import pytest


def _one_hot(labels: list[int], classes: int = 4) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[labels]


def test_greedy_ctc_collapses_repeats_and_drops_blanks_on_either_time_axis() -> None:
    steps = _one_hot([0, 2, 2, 0, 2, 3, 3, 0])  # [T, C]
    assert judging.greedy_ctc(steps[:, None], time_axis=0, blank=0) == [(2, 2, 3)]
    assert judging.greedy_ctc(steps[None], time_axis=1, blank=0) == [(2, 2, 3)]
    assert judging.greedy_ctc(steps[None], time_axis=1, blank=3) == [(0, 2, 0, 2, 0)]


def test_ctc_text_counts_whole_texts_while_steps_hide_a_flip() -> None:
    reference = [[_one_hot([0, 1, 1, 0, 2])[:, None]], [_one_hot([1, 0, 2, 2, 0])[:, None]]]
    flipped = _one_hot([0, 1, 0, 0, 2])[:, None]  # one step differs: same text
    changed = _one_hot([1, 0, 2, 1, 0])[:, None]  # one step differs: another text
    candidate = [[flipped], [changed]]
    text = judging.ctc_text(time_axis=0, blank=0)(reference, candidate)
    steps = judging.step_agreement()(reference, candidate)
    assert (text.value, text.count, text.unit) == (0.5, 2, "texts")
    assert (steps.value, steps.count) == (0.8, 10)


def test_ctc_text_can_compare_what_the_ids_spell() -> None:
    charset = ["", "c", "C", "4"]  # ddddocr's charset holds both cases of a letter
    reference = [[_one_hot([1, 0, 3])[:, None]]]
    candidate = [[_one_hot([2, 0, 3])[:, None]]]  # "C4" where fp32 read "c4"
    exact = judging.ctc_text(time_axis=0, blank=0)
    caseless = judging.ctc_text(
        time_axis=0,
        blank=0,
        spell=lambda ids: "".join(charset[i] for i in ids).casefold(),
        name="text equality, case aside",
    )
    assert exact(reference, candidate).value == 0.0
    assert caseless(reference, candidate).value == 1.0
    assert caseless.name == "text equality, case aside (CTC, blank 0)"


def test_top1_cosine_iou_exact_within() -> None:
    ref = [[np.array([[0.9, 0.1], [0.2, 0.8]]), np.zeros((2, 2))]]
    cand = [[np.array([[0.6, 0.4], [0.6, 0.4]]), np.zeros((2, 2))]]
    assert judging.top1()(ref, cand).value == 0.5
    assert judging.cosine(1)(ref, cand).value == 1.0  # both all zero
    assert judging.cosine(0)(ref, [[-ref[0][0]]]).value == -1.0
    assert judging.mask_iou(0)(ref, cand).value == 1 / 3
    assert judging.exact(0)(ref, ref).value == 1.0
    assert judging.exact(0)(ref, cand).value == 0.0
    assert judging.within(0, 0.31)(ref, cand).value == 0.0
    assert judging.within(0, 0.61)(ref, cand).value == 1.0
    assert judging.top1()(ref, cand).show() == "0.5000 of 2 rows"


def test_deciding_margins_are_the_smallest_margin_that_changes_the_text():
    blank = 0
    # steps: a (margin 3), a (margin 0.1: its runner-up is blank, same text "a" either way),
    # b (margin 0.5: runner-up c changes the text), blank (margin 2)
    seq = np.array(
        [
            [0.0, 3.0, 0.0, 0.0],
            [2.9, 3.0, 0.0, 0.0],
            [0.0, 0.0, 3.0, 2.5],
            [2.0, 0.0, 0.0, 0.0],
        ],
        dtype=np.float32,
    )
    steady = np.array([[5.0, 0.0, 0.0, 0.0]] * 4, dtype=np.float32)  # blank everywhere
    tn_c = np.stack([seq, steady], axis=1)  # [T, N, C]
    found = judging.deciding_margins(tn_c, time_axis=0, blank=blank)
    assert found[0] == pytest.approx(0.5)
    assert found[1] == pytest.approx(5.0)  # any step's runner-up adds a label
    again = judging.deciding_margins(tn_c.swapaxes(0, 1), time_axis=1, blank=blank)
    assert np.allclose(again, found)


def test_viterbi_finds_the_best_tag_path_of_the_crf() -> None:
    import itertools

    rng = np.random.default_rng(4)
    crf = judging.Crf(rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=3))
    emissions = rng.normal(size=(5, 3))

    def total(path) -> float:
        steps = sum(emissions[t, k] for t, k in enumerate(path))
        moves = sum(crf.transitions[a, b] for a, b in itertools.pairwise(path))
        return crf.start[path[0]] + steps + moves + crf.end[path[-1]]

    best = max(itertools.product(range(3), repeat=5), key=total)
    assert judging.viterbi(emissions, crf.transitions, crf.start, crf.end) == best


def test_crf_tags_judge_each_sequence_over_its_real_steps_only() -> None:
    crf = judging.Crf(np.zeros((2, 2)), np.zeros(2), np.zeros(2))
    tags = np.eye(2, dtype=np.float32)
    reference = [[tags[[0, 1, 1, 0]][None]], [tags[[1, 1, 0, 0]][None]]]
    candidate = [[tags[[0, 1, 1, 1]][None]], [tags[[1, 0, 0, 0]][None]]]
    # the first differs only on its padding (3 real steps), the second on a real step
    score = judging.crf_tags(crf, [3, 4])(reference, candidate)
    assert (score.value, score.count, score.unit) == (0.5, 2, "sequences")
    steps = judging.real_steps([3, 4])(reference, candidate)
    assert (steps.value, steps.count) == (6 / 7, 7)


def test_detections_and_boxes_kept_judge_a_yolo_head() -> None:
    head = np.zeros((1, 6, 100), np.float32)  # 4 box rows, 2 classes, 100 anchors
    head[0, :4] = 10
    head[0, :, 0] = [50, 50, 20, 20, 0.9, 0]
    head[0, :, 1] = [150, 150, 20, 20, 0, 0.8]
    lost_one = head.copy()
    lost_one[0, 5, 1] = 0.1
    reference, candidate = [[head], [head]], [[head], [lost_one]]
    same = judging.detections()(reference, candidate)
    assert (same.value, same.count, same.unit) == (0.5, 2, "images")
    kept = judging.boxes_kept()(reference, candidate)
    assert (kept.value, kept.count, kept.unit) == (0.75, 4, "fp32 boxes")


def test_detection_margins_count_only_anchors_that_decide() -> None:
    head = np.zeros((6, 100), np.float32)  # 4 box rows, 2 classes, 100 anchors
    head[:4] = 10
    head[:4, 1:] = np.arange(1, 100) * 30  # every other anchor far apart
    head[:, 0] = [50, 50, 20, 20, 0.9, 0]  # a sure detection
    head[:, 1] = [50, 50, 20, 20, 0.26, 0]  # its twin, suppressed: cannot decide anything
    head[:, 2] = [400, 400, 20, 20, 0, 0.2]  # a lone anchor under the threshold
    logit = np.log(0.2 / 0.8) - np.log(0.25 / 0.75)
    assert abs(judging.detection_margins(head) - abs(logit)) < 1e-6
    head[4:, 2] = 0  # nothing near the threshold but the sure one, 3.3 logits above it
    assert abs(judging.detection_margins(head) - (np.log(9) - np.log(1 / 3))) < 1e-6
