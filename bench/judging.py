"""Task metrics the benchmarks judge every model with: a candidate's outputs against fp32's.

Each judge takes, per held-out sample, the list of a model's outputs (in the model's
output order) from the reference and from the candidate, and returns a :class:`Score`:
the value, how many units it was counted over (samples, texts, steps, pixels) and the
unit's name, so a table can say "0.985 of 200 texts" instead of a bare number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from slimfleet.host.compress import detections as found
from slimfleet.host.compress import fidelity

Outputs = Sequence[np.ndarray]
"""One sample's outputs, in the model's output order."""


@dataclass(frozen=True)
class Score:
    value: float
    count: int
    unit: str

    def show(self) -> str:
        return f"{self.value:.4f} of {self.count} {self.unit}"


@dataclass(frozen=True)
class Judge:
    """A named task metric on output ``output`` (index in the model's outputs)."""

    name: str
    output: int
    score: Callable[[list[np.ndarray], list[np.ndarray]], Score]

    def __call__(self, reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> Score:
        pick = self.output
        return self.score([r[pick] for r in reference], [c[pick] for c in candidate])


def _pairs(reference: list[np.ndarray], candidate: list[np.ndarray]):
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference samples, {len(candidate)} candidate ones")
    return zip(reference, candidate, strict=True)


def top1(output: int = 0) -> Judge:
    """Top-1 class agreement over every row of ``[..., classes]`` scores."""

    def score(reference, candidate) -> Score:
        hits = total = 0
        for r, c in _pairs(reference, candidate):
            hits += int(np.sum(r.argmax(-1) == c.argmax(-1)))
            total += r.size // r.shape[-1]
        return Score(hits / total, total, "rows")

    return Judge("top-1 agreement", output, score)


def step_agreement(output: int = 0) -> Judge:
    """Per-step argmax agreement of ``[..., steps, classes]`` sequence scores."""
    judge = top1(output)

    def score(reference, candidate) -> Score:
        s = judge.score(reference, candidate)
        return Score(s.value, s.count, "steps")

    return Judge("step argmax agreement", output, score)


def greedy_ctc(scores: np.ndarray, *, time_axis: int, blank: int) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of ``[T, N, C]`` or ``[N, T, C]`` scores: one label tuple per
    sequence (argmax per step, repeats collapsed, blanks dropped)."""
    best = np.moveaxis(scores, time_axis, -2).argmax(-1).reshape(-1, scores.shape[time_axis])
    decoded = []
    for row in best:
        labels, previous = [], None
        for label in row.tolist():
            if label != previous and label != blank:
                labels.append(label)
            previous = label
        decoded.append(tuple(labels))
    return decoded


def ctc_text(
    output: int = 0,
    *,
    time_axis: int,
    blank: int,
    spell: Callable[[tuple[int, ...]], str] | None = None,
    name: str = "decoded text equality",
) -> Judge:
    """Decoded-text equality: greedy CTC on both models' scores, sequence by sequence;
    with ``spell`` the texts the label ids spell are compared (e.g. case-folded)."""

    def text(ids: tuple[int, ...]):
        return ids if spell is None else spell(ids)

    def score(reference, candidate) -> Score:
        hits = total = 0
        for r, c in _pairs(reference, candidate):
            for a, b in zip(
                greedy_ctc(r, time_axis=time_axis, blank=blank),
                greedy_ctc(c, time_axis=time_axis, blank=blank),
                strict=True,
            ):
                hits += text(a) == text(b)
                total += 1
        return Score(hits / total, total, "texts")

    return Judge(f"{name} (CTC, blank {blank})", output, score)


def deciding_margins(scores: np.ndarray, *, time_axis: int, blank: int) -> np.ndarray:
    """For each sequence of ``[T, N, C]`` (or ``[N, T, C]``) scores, the smallest margin
    (best minus runner-up score) among the steps where the runner-up winning would change
    the greedy-CTC text; ``inf`` when no single step's change would.

    A text whose deciding margin is ``m`` changes under any perturbation that moves that
    step's two scores by about ``m``: the share of texts under ``m`` is how many any
    compressed model with errors of that size will change, whatever its method."""
    moved = np.moveaxis(scores, time_axis, -2)
    seqs = moved.reshape(-1, *moved.shape[-2:])  # [N, T, C]
    margins = []
    for seq in seqs:
        order = np.argsort(seq, -1)
        top, second = order[:, -1], order[:, -2]
        steps = np.arange(len(seq))
        margin = seq[steps, top] - seq[steps, second]
        text = greedy_ctc(seq[:, None], time_axis=0, blank=blank)
        found = np.inf
        for t in np.argsort(margin, kind="stable"):
            flipped = seq.copy()
            flipped[t, second[t]] = seq[t, top[t]] + 1.0
            if greedy_ctc(flipped[:, None], time_axis=0, blank=blank) != text:
                found = float(margin[t])
                break
        margins.append(found)
    return np.asarray(margins)


def viterbi(emissions: np.ndarray, transitions: np.ndarray, start: np.ndarray, end: np.ndarray):
    """The best tag path of a linear-chain CRF over ``[T, tags]`` emissions (the decoding
    a CRF tagger's package runs on its network's scores); empty for no steps."""
    if len(emissions) == 0:
        return ()
    score, back = start + emissions[0], []
    for step in emissions[1:]:
        total = score[:, None] + transitions + step[None]
        back.append(total.argmax(0))
        score = total.max(0)
    path = [int((score + end).argmax())]
    for pointers in reversed(back):
        path.append(int(pointers[path[-1]]))
    return tuple(path[::-1])


@dataclass(frozen=True)
class Crf:
    """A tagger's CRF: ``transitions[i, j]`` scores tag i followed by tag j."""

    transitions: np.ndarray
    start: np.ndarray
    end: np.ndarray


def crf_tags(crf: Crf, lengths: Sequence[int], output: int = 0) -> Judge:
    """Tag-sequence equality of ``[1, T, tags]`` emissions decoded by ``crf`` over each
    sample's real steps (``lengths``, one per sample; padding is not the user's): for a
    word segmenter, the same words."""

    def score(reference, candidate) -> Score:
        pairs = list(_pairs(reference, candidate))
        if len(pairs) != len(lengths):
            raise ValueError(f"{len(pairs)} samples, {len(lengths)} lengths")
        same = [
            viterbi(r[0, :n], crf.transitions, crf.start, crf.end)
            == viterbi(c[0, :n], crf.transitions, crf.start, crf.end)
            for (r, c), n in zip(pairs, lengths, strict=True)
        ]
        return Score(float(np.mean(same)), len(same), "sequences")

    return Judge("tag sequence equality (CRF Viterbi)", output, score)


def real_steps(lengths: Sequence[int], output: int = 0) -> Judge:
    """Per-step argmax agreement of ``[1, T, tags]`` scores over each sample's real steps."""
    judge = step_agreement(output)

    def score(reference, candidate) -> Score:
        cut = [
            (r[:, :n], c[:, :n])
            for (r, c), n in zip(_pairs(reference, candidate), lengths, strict=True)
        ]
        return judge.score([r for r, _ in cut], [c for _, c in cut])

    return Judge("step argmax agreement (real steps)", output, score)


def cosine(output: int = 0, name: str = "output cosine") -> Judge:
    """Mean over samples of each whole output's cosine as the search scores it
    (:func:`slimfleet.host.compress.fidelity.cosine`: times the ratio of the norms)."""

    def score(reference, candidate) -> Score:
        pairs = [(r, c, np.isfinite(r)) for r, c in _pairs(reference, candidate)]  # as the search
        values = [fidelity.cosine(r[finite], c[finite]) for r, c, finite in pairs]
        return Score(float(np.mean(values)), len(values), "samples")

    return Judge(name, output, score)


def detections(output: int = 0, score: float = 0.25, nms: float = 0.7, iou: float = 0.5) -> Judge:
    """Share of images whose detections (a YOLO head, see
    :mod:`slimfleet.host.compress.detections`) equal fp32's box for box."""

    def judge(reference, candidate) -> Score:
        hits = [
            found.same_detections(
                found.detections(r, score, nms), found.detections(c, score, nms), iou
            )
            for r, c in _images(reference, candidate)
        ]
        return Score(sum(hits) / len(hits), len(hits), "images")

    return Judge(f"same detections (score {score}, IoU {iou})", output, judge)


def _images(reference: list[np.ndarray], candidate: list[np.ndarray]):
    """Each image's pair of heads, over samples and the batch axis within them."""
    for r, c in _pairs(reference, candidate):
        yield from zip(r, c, strict=True)


def boxes_kept(output: int = 0, score: float = 0.25, nms: float = 0.7, iou: float = 0.5) -> Judge:
    """Share of fp32's detections the candidate still makes (same class, IoU >= ``iou``)."""

    def judge(reference, candidate) -> Score:
        kept = total = 0
        for r, c in _images(reference, candidate):
            want = found.detections(r, score, nms)
            kept += found.matched(want, found.detections(c, score, nms), iou)
            total += len(want)
        return Score(kept / total if total else 1.0, total, "fp32 boxes")

    return Judge("fp32 boxes kept", output, judge)


def detection_margins(head: np.ndarray, score: float = 0.25, nms: float = 0.7) -> float:
    """How close one image's detections are to changing: the smallest distance, in
    logits, between the threshold ``score`` and the best class score of an anchor that
    decides them (a detection, which would drop out below it, or an anchor no detection
    of its class suppresses, which would add one above it)."""
    rows = found.anchors_last(np.asarray(head, np.float64))
    best = rows[:, found.BOX_VALUES :].max(-1)
    kept = found.detections(head, score, nms)
    boxes = found.corners(rows)
    classes = rows[:, found.BOX_VALUES :].argmax(-1)
    deciding = np.ones(len(rows), bool)  # with no detection, any anchor could add one
    if len(kept):
        overlap = found.iou_matrix(boxes, kept.boxes) > nms
        overlap &= classes[:, None] == kept.classes[None, :]
        deciding = ~overlap.any(-1) | np.isin(best, kept.scores)
    if not deciding.any():
        return np.inf
    logit = np.log(np.clip(best[deciding], 1e-7, 1 - 1e-7) / np.clip(1 - best[deciding], 1e-7, 1))
    return float(np.abs(logit - np.log(score / (1 - score))).min())


def mask_iou(output: int = 0, threshold: float = 0.5) -> Judge:
    """Mean IoU of the masks ``output > threshold`` (two empty masks count as 1)."""

    def score(reference, candidate) -> Score:
        values = []
        for r, c in _pairs(reference, candidate):
            a, b = r > threshold, c > threshold
            union = np.sum(a | b)
            values.append(1.0 if union == 0 else float(np.sum(a & b) / union))
        return Score(float(np.mean(values)), len(values), "masks")

    return Judge(f"mask IoU at {threshold}", output, score)


def exact(output: int = 0) -> Judge:
    """Share of samples whose output equals fp32's exactly (integer outputs)."""

    def score(reference, candidate) -> Score:
        hits = [bool(np.array_equal(r, c)) for r, c in _pairs(reference, candidate)]
        return Score(sum(hits) / len(hits), len(hits), "samples")

    return Judge("exact match", output, score)


def within(output: int = 0, tolerance: float = 0.02) -> Judge:
    """Share of samples whose scores all lie within ``tolerance`` of fp32's (a detector's
    probability, where argmax and cosine say nothing)."""

    def score(reference, candidate) -> Score:
        hits = [
            bool(np.all(np.abs(r.astype(np.float64) - c) <= tolerance))
            for r, c in _pairs(reference, candidate)
        ]
        return Score(sum(hits) / len(hits), len(hits), "samples")

    return Judge(f"score within {tolerance}", output, score)
