"""Recovery's distillation loss aims at what the output's task metric judges."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="recovery needs torch: pip install 'slimfleet[train]'")

from slimfleet.host.compress import recovery  # noqa: E402
from slimfleet.host.compress.metricdetection import DETECTIONS  # noqa: E402
from slimfleet.host.compress.metricspec import MetricSpec  # noqa: E402
from tests import models  # noqa: E402

RNG = np.random.default_rng(6)


def yolo_head(anchors: int = 400) -> torch.Tensor:
    """[1, 4 + 3, A]: boxes in pixels, background scores near 0, two near the threshold."""
    head = np.zeros((1, 7, anchors), np.float32)
    head[0, :4] = RNG.uniform(10, 300, (4, anchors))
    head[0, 4:] = RNG.uniform(0, 0.01, (3, anchors))
    head[0, 4, :2] = 0.3, 0.27
    return torch.from_numpy(head)


def test_a_detector_head_is_not_read_as_2100_classes():
    """The old loss read [1, 22, 2100] as rows of 2100 class scores: cross-entropy against
    the anchor with the highest value (a box coordinate), 6.9 on 320n."""
    teacher = yolo_head()
    assert float(recovery.output_loss(teacher, teacher, DETECTIONS)) == pytest.approx(0.0)
    assert float(recovery.output_loss(teacher, teacher)) > 1.0  # the shape heuristic


def test_the_detection_loss_weighs_a_score_crossing_the_threshold_over_background():
    teacher = yolo_head()
    lost = teacher.clone()
    lost[0, 4, 0] = 0.2  # the detection at 0.3 falls under 0.25
    background = teacher.clone()
    background[0, 5, 100:] *= 3  # background scores triple, far under the threshold
    moved_box = teacher.clone()
    moved_box[0, 0, 300] += 50  # a background anchor's box: never seen
    loss = {
        name: float(recovery.output_loss(change, teacher, DETECTIONS))
        for name, change in (("lost", lost), ("background", background), ("box", moved_box))
    }
    assert loss["lost"] > 100 * max(loss["background"], loss["box"])


def test_the_detection_loss_reads_anchors_last_heads_with_objectness():
    teacher = yolo_head().transpose(1, 2).contiguous()  # [1, A, 4 + 1 + 2]
    teacher[0, 0, 5] = 0.9  # objectness 0.3 x class 0.9: 0.27
    spec = MetricSpec("detections", (("objectness", 1),))
    student = teacher.clone()
    student[0, 0, 4] = 0.2  # objectness 0.2: 0.18, under the threshold
    assert float(recovery.output_loss(teacher, teacher, spec)) == pytest.approx(0.0)
    logit = np.log(0.18 / 0.82) - np.log(0.27 / 0.73)  # the one score over the floor
    expected = 0.5 * logit**2  # smooth L1 within one logit
    assert float(recovery.output_loss(student, teacher, spec)) == pytest.approx(expected, rel=0.02)


def test_masks_and_embeddings_are_not_class_scores():
    """u2net's [1, 1, 320, 320] matte was read as rows of 320 classes along its width."""
    teacher = torch.from_numpy(RNG.uniform(0, 1, (1, 1, 32, 32)).astype(np.float32))
    student = teacher + 0.1
    iou = MetricSpec("iou", (("threshold", 0.5),))
    expected = recovery.relative_mse(student, teacher)
    assert float(recovery.output_loss(student, teacher, iou)) == pytest.approx(float(expected))
    assert float(recovery.output_loss(student, teacher)) != pytest.approx(float(expected))


def test_a_segmenters_classes_are_on_their_axis():
    logits = torch.from_numpy(RNG.normal(size=(1, 5, 8, 8)).astype(np.float32))
    spec = MetricSpec("pixels", (("axis", 1),))
    on_axis = recovery.output_loss(logits, logits, spec)
    last = logits.movedim(1, -1)
    by_hand = recovery.output_loss(last, last, MetricSpec("top1"))
    assert float(on_axis) == pytest.approx(float(by_hand))


def test_loss_specs_are_what_the_search_judges():
    model = models.detector_head()
    feeds = models.image_feeds(4, seed=3)
    outputs = recovery.teacher_outputs(model, feeds)
    (spec,) = recovery.loss_specs(model, outputs)
    assert spec.kind == "detections"
    seg = models.segmenter()
    outputs = recovery.teacher_outputs(seg, [{"image": f["x"]} for f in feeds])
    assert recovery.loss_specs(seg, outputs) == [MetricSpec("pixels", (("axis", 1),))]


def test_a_score_int8_put_at_zero_still_has_a_gradient():
    """Clamping before the logit gave no gradient to a score at exactly 0: the lost
    detection could not be pulled back."""
    teacher = yolo_head()
    student = teacher.clone()
    student[0, 4, 0] = 0.0
    student.requires_grad_(True)
    loss = recovery.output_loss(student, teacher, DETECTIONS)
    loss.backward()
    assert student.grad[0, 4, 0] < 0  # raising the score lowers the loss
    assert torch.isfinite(student.grad).all()


def test_a_score_past_1_from_a_learned_scale_gives_no_nan():
    teacher = yolo_head()
    student = teacher.clone()
    student[0, 4, 0], student[0, 5, 1] = 1.0004, -0.0002
    student.requires_grad_(True)
    loss = recovery.output_loss(student, teacher, DETECTIONS)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def softmax_rows(rows: int = 6, classes: int = 214, sure: float = 8.0) -> torch.Tensor:
    """Probabilities as a classifier that ends in a softmax outputs them: each row sure
    of one class (magika: 214 file types)."""
    logits = RNG.normal(0, 1, (rows, classes))
    logits[np.arange(rows), RNG.integers(0, classes, rows)] += sure
    return torch.softmax(torch.from_numpy(logits.astype(np.float32)), -1)


def test_probabilities_are_judged_as_their_logits():
    """Read as logits, a softmax's probabilities all lie within 1 of each other: the
    cross-entropy was about log(214) = 5.4 for a student equal to its teacher."""
    teacher = softmax_rows()
    spec = MetricSpec("top1")
    assert float(recovery.output_loss(teacher, teacher, spec)) < 0.5  # -log p of the sure class
    swapped = teacher.clone()
    best = teacher.argmax(-1)
    swapped[torch.arange(len(best)), best] = 0.001  # the sure class lost
    assert float(recovery.output_loss(swapped, teacher, spec)) > 3


def test_a_probability_rounded_to_zero_still_has_a_gradient():
    teacher = softmax_rows()
    student = teacher.clone()
    student[:, :100] = 0  # int8 puts every unlikely class at exactly 0
    student.requires_grad_(True)
    recovery.output_loss(student, teacher, MetricSpec("top1")).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def _tagger_outputs(count: int = 4):
    import onnxruntime as ort

    teacher = models.token_tagger()
    session = ort.InferenceSession(teacher.SerializeToString())
    feeds = [{"ids": RNG.integers(0, 50, (1, 12))} for _ in range(count)]
    return teacher, [session.run(None, feed) for feed in feeds]


@pytest.mark.parametrize(
    ("given", "kind"),
    [
        ({}, "steps"),  # detected: token ids in, one tag per step out
        ({"tags": "top1"}, "top1"),  # the user's choice
        ({"tags": "no_such_kind"}, "steps"),  # a plugin's kind: the detected one
        ({"tags": "ctc:blank=10"}, "steps"),  # refused on these 6 classes: detected
        ({"tags": "top1", "nope": "cosine"}, "top1"),  # one refused: the other kept
    ],
)
def test_the_loss_aims_at_the_metric_the_user_gave(given, kind):
    teacher, outputs = _tagger_outputs()
    (spec,) = recovery.loss_specs(teacher, outputs, given)
    assert spec.kind == kind


def test_an_ignored_output_is_left_out_of_the_loss():
    teacher = softmax_rows()
    wrong = torch.flip(teacher, [-1])
    ignore, top1 = MetricSpec("ignore"), MetricSpec("top1")
    both = recovery.distill_loss([teacher, wrong], [teacher, teacher], [top1, ignore])
    assert float(both) == pytest.approx(float(recovery.output_loss(teacher, teacher, top1)))
    student = wrong.clone().requires_grad_(True)
    none = recovery.distill_loss([student], [teacher], [ignore])
    none.backward()  # every output ignored: a zero that still backpropagates
    assert float(none) == 0.0 and student.grad is not None
