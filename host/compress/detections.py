"""Object detections from a one-stage detector's raw head, and whether two sets agree.

A YOLO-style head scores every anchor: four box values and one score per class,
``[N, 4 + C, A]`` (Ultralytics YOLOv8 and later: centre x, centre y, width, height in
pixels, then class probabilities) or ``[N, A, 4 + C]`` (``[N, A, 5 + C]`` with an
objectness column, YOLOv5/v7, when ``objectness`` is set). What its user sees is the
boxes left after the score threshold and non-maximum suppression, so that is what
:func:`detections` computes and :func:`same_detections` compares: a candidate keeps an
image when every detection of the original's has one of its own with the same class and
an IoU of at least ``match_iou``, one to one (a maximum matching), and it has no others.

Pure numpy. Bounds: at most :data:`MAX_CANDIDATES` boxes above the threshold enter
suppression (the highest scored) and :data:`MAX_DETECTIONS` come out, so a candidate
that scores every anchor high costs at most :data:`MAX_CANDIDATES` passes of one
vector operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CANDIDATES = 3000
"""Boxes above the score threshold that enter suppression, highest scores first
(Ultralytics takes 30,000 before suppression; a sane head has far fewer above 0.25)."""
MAX_DETECTIONS = 300
"""Detections kept per image after suppression (Ultralytics' ``max_det``)."""
BOX_VALUES = 4


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes`` ``[K, 4]`` as x1, y1, x2, y2; ``classes`` and
    ``scores`` ``[K]``, highest score first."""

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def anchors_last(head: np.ndarray) -> np.ndarray:
    """One image's head as ``[A, 4 + C]``, whichever layout it came in: the shorter of
    its two axes holds the per-anchor values (anchors outnumber classes)."""
    return head.T if head.shape[0] < head.shape[1] else head


def corners(rows: np.ndarray) -> np.ndarray:
    """``[K, 4]`` x1, y1, x2, y2 from rows starting with centre x, centre y, width, height."""
    centre, size = rows[:, :2], rows[:, 2:BOX_VALUES]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``[K, 4]`` with every box of ``b`` ``[L, 4]`` (x1y1x2y2)."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    same = np.all(a[:, None, :] == b[None, :, :], axis=-1)  # a zero-area box is itself
    return np.where(union > 0, inter / np.where(union > 0, union, 1), same.astype(float))


def detections(
    head: np.ndarray, score: float, nms_iou: float, objectness: bool = False
) -> Detections:
    """What one image's head ``[4 + C, A]`` or ``[A, 4 + C]`` detects: boxes whose best
    class score (times objectness) reaches ``score``, suppressed per class where they
    overlap a higher-scored box by more than ``nms_iou``."""
    rows = anchors_last(np.asarray(head, dtype=np.float64))
    first_class = BOX_VALUES + int(objectness)
    classes = rows[:, first_class:]
    if objectness:
        classes = classes * rows[:, BOX_VALUES : BOX_VALUES + 1]
    if not rows.size or not classes.shape[-1]:
        empty = np.zeros(0)
        return Detections(np.zeros((0, BOX_VALUES)), empty.astype(int), empty)
    classes = np.where(np.isnan(classes), -np.inf, classes)  # NaN is no score
    best = classes.argmax(-1)
    scores = classes[np.arange(len(rows)), best]
    keep = np.flatnonzero(scores >= score)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:MAX_CANDIDATES]
    boxes = corners(rows[keep])
    chosen = _suppress(boxes, best[keep], nms_iou)[:MAX_DETECTIONS]
    return Detections(boxes[chosen], best[keep][chosen], scores[keep][chosen])


def _suppress(boxes: np.ndarray, classes: np.ndarray, nms_iou: float) -> list[int]:
    """Greedy non-maximum suppression per class over boxes sorted by score."""
    alive = np.ones(len(boxes), dtype=bool)
    chosen = []
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        if len(chosen) == MAX_DETECTIONS:
            break
        chosen.append(i)
        rest = np.flatnonzero(alive[i + 1 :]) + i + 1
        same = rest[classes[rest] == classes[i]]
        if same.size:
            overlap = iou_matrix(boxes[i : i + 1], boxes[same])[0]
            alive[same[overlap > nms_iou]] = False
    return chosen


def matched(reference: Detections, candidate: Detections, match_iou: float) -> int:
    """The most of ``reference``'s detections that can each be paired with a different
    candidate detection of the same class overlapping it by at least ``match_iou`` (a
    maximum bipartite matching, by augmenting paths: two neighbours of one class whose
    best overlaps cross still both match)."""
    if not len(reference) or not len(candidate):
        return 0
    fits = iou_matrix(reference.boxes, candidate.boxes) >= match_iou
    fits &= reference.classes[:, None] == candidate.classes[None, :]
    partner = np.full(len(candidate), -1)

    def augment(row: int, tried: np.ndarray) -> bool:
        for col in np.flatnonzero(fits[row] & ~tried):
            tried[col] = True
            if partner[col] < 0 or augment(int(partner[col]), tried):
                partner[col] = row
                return True
        return False

    return sum(augment(row, np.zeros(len(candidate), bool)) for row in range(len(reference)))


def same_detections(reference: Detections, candidate: Detections, match_iou: float) -> bool:
    """Every detection of ``reference`` is matched (see :func:`matched`) and the
    candidate has no other."""
    return len(reference) == len(candidate) == matched(reference, candidate, match_iou)
