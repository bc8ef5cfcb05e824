"""Accuracy recovery: quantization-aware training of a QDQ model, distilled from the float one.

:func:`train` fine-tunes a static-int8 QDQ model (see :mod:`.qdqtorch`) so its outputs
come closer to the float model's on the calibration samples: no labels, the float model
is the teacher (as PaddleSlim ACT and NNCF do). Bounds:

* time: ``seconds`` of wall time for the training loop (checked every step), plus one
  teacher pass and the evaluations of the held-out samples;
* memory: the teacher's outputs of every sample (outputs only) and one sample's
  activations for the backward pass; samples are read one at a time;
* steps: ``max_steps`` when given.

One sample in :data:`HELD_OUT_SHARE` (at least one, when there are two or more) is held
out; the weights with the lowest held-out loss are the ones written back, so training
never returns a model worse (on that loss) than the post-training one it started from.
The loss follows each output's task metric, the one the user gave or detected as the
search detects it (:func:`loss_specs`, :func:`output_loss`): class scores by their top classes and argmax, a detector head by
its score logits and boxes, anything else by its mean squared error divided by the mean
square of the teacher's output (so outputs of any scale weigh alike); averaged over
outputs, leaving out those whose metric is ``ignore``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from slimfleet.agent.errors import InputError
from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.detections import BOX_VALUES
from slimfleet.host.compress.metricdetection import looks_like_probabilities, signature_specs
from slimfleet.host.compress.metricspec import MetricSpec, parse_metric
from slimfleet.host.compress.modelfile import io_signature, with_outputs
from slimfleet.host.compress.qdqtorch import QdqGraph
from slimfleet.host.passes import Feed

log = logging.getLogger(__name__)

HELD_OUT_SHARE = 8
"""One calibration sample in 8 is held out to pick the best weights (at most 16)."""
MAX_HELD_OUT = 16
SCALE_LR = 5.0
"""Scales (log space) learn this many times faster than weights (in step units): measured
on outlier-heavy layers, scales bring most of the gain and noisy weight steps undo it."""
FEATURE_OPS = ("Conv", "Gemm", "MatMul")
CLASS_AXIS = 8
CLASS_KINDS = ("top1", "ctc", "steps")
"""Task metrics that read an argmax over the last axis."""
TOP_K = 5
SCORE_FLOOR = 0.05
"""A detector's class scores from which their logits count in the loss (the usual
threshold, 0.25, is 1.85 logits above; lower scores are background)."""
LOGIT_EPS = 1e-4
"""Scores are squeezed into (eps, 1 - eps) before their logits: at most 9.2 logits."""
WARMUP = 0.05
"""The learning rate rises linearly over the first 5% of the budget (Adam's first steps
are sign steps of noisy gradients), then decays on a cosine."""
CHECKPOINTS = 12
"""The held-out loss is measured about 12 times over the budget (the loss curve)."""


@dataclass
class TrainResult:
    model: onnx.ModelProto
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, seconds, held-out loss) at each checkpoint, step 0 being the PTQ model."""
    best_step: int = 0
    steps: int = 0
    seconds: float = 0.0
    label: str = "QAT"
    """What trained: ``QAT``, or ``distillation`` for a float model."""
    skipped: int = 0
    """Steps not taken: their gradients held inf or NaN (an activation overflowed)."""

    def summary(self) -> str:
        """One line: the held-out loss before and after, steps, time, the curve."""
        first, best = self.curve[0][2], min(c[2] for c in self.curve)
        curve = " ".join(f"{step}:{loss:.4g}" for step, _, loss in self.curve)
        skipped = f", {self.skipped} skipped: gradients not finite" if self.skipped else ""
        return (
            f"{self.label} {self.steps} steps in {self.seconds:.0f} s{skipped}: held-out loss "
            f"{first:.4g} -> {best:.4g} (best at step {self.best_step}; curve {curve})"
        )


def float_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float initializers of ``model`` (the teacher), by name."""
    return {
        t.name: onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }


def teacher_outputs(
    model: onnx.ModelProto, samples: Sequence[Feed], threads: int = 1
) -> list[list[np.ndarray]]:
    """The float model's outputs on every sample (onnxruntime, one sample at a time)."""
    session = open_session(model.SerializeToString(), threads)
    return [session.run(None, dict(feed)) for feed in samples]


def feature_names(qdq: onnx.ModelProto, teacher: onnx.ModelProto) -> list[tuple[str, str]]:
    """(student tensor, teacher tensor) pairs distilled with ``features``: the output of
    each weighted node (Conv, Gemm, MatMul) of ``qdq`` as the next node sees it (after
    its QuantizeLinear / DequantizeLinear, which also stand in for a Relu the quantizer
    folded away), against the tensor of that name in ``teacher``; the model's outputs
    are left to the output loss."""
    computed = {o for n in teacher.graph.node for o in n.output}
    computed -= {o.name for o in teacher.graph.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in qdq.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    pairs = []
    for node in qdq.graph.node:
        if node.op_type not in FEATURE_OPS:
            continue
        names = [node.output[0]]
        for op in ("QuantizeLinear", "DequantizeLinear"):
            after = [u for u in users.get(names[-1], []) if u.op_type == op]
            if len(after) != 1:
                break
            names.append(after[0].output[0])
        known = [n for n in names if n in computed]
        if known:
            pairs.append((names[-1] if len(names) == 3 else names[0], known[0]))
    return pairs


def _same_shapes(
    graph: QdqGraph,
    teacher: onnx.ModelProto,
    pairs: list[tuple[str, str]],
    sample: Feed,
    threads: int,
) -> list[tuple[str, str]]:
    """The ``pairs`` whose student and teacher tensors have one shape on ``sample``
    (a pruned producer's output is narrower than the teacher's), found once."""
    wanted = [name for _, name in pairs]
    session = open_session(with_outputs(teacher, wanted).SerializeToString(), threads)
    theirs = session.run(wanted, dict(sample))
    with torch.no_grad():
        feed = {k: _input(v) for k, v in sample.items()}
        ours = graph(feed, [name for name, _ in pairs])[len(graph.outputs) :]
    return [p for p, s, t in zip(pairs, ours, theirs, strict=True) if tuple(s.shape) == t.shape]


def loss_specs(
    teacher: onnx.ModelProto,
    outputs: Sequence[Sequence[np.ndarray]],
    metrics: Mapping[str, str] | None = None,
) -> list[MetricSpec]:
    """Each float output's task metric: what the distillation loss of that output aims
    at (see :func:`output_loss`). ``metrics`` are the ones the user gave
    (:attr:`~slimfleet.host.passes.PassContext.metrics`); the others are detected from
    the teacher's ``outputs`` on the calibration samples and its signature, as the search
    detects them. A given metric that does not parse back or that the calibration
    samples refuse (a detector that finds nothing on them) is left to detection, alone,
    and logged."""
    names = [o.name for o in teacher.graph.output]
    reference = [dict(zip(names, sample, strict=True)) for sample in outputs]
    signature = io_signature(teacher)
    given = {}
    for name, text in (metrics or {}).items():
        try:
            one = dict([parse_metric(f"{name}={text}")])
            signature_specs(reference, signature, one)  # refused here: InputError
        except InputError as exc:
            log.warning("the loss of %s follows its detected metric: %s", name, exc)
            continue
        given.update(one)
    specs = signature_specs(reference, signature, given)
    return [specs[n] for n, value in zip(names, outputs[0], strict=True) if value.dtype.kind == "f"]


def distill_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    specs: Sequence[MetricSpec | None] = (),
    probabilities: Sequence[bool | None] = (),
) -> torch.Tensor:
    """The mean over float outputs of a distillation loss (see :func:`output_loss`), each
    aimed by its task metric in ``specs`` where given and read as probabilities where
    ``probabilities`` says so (decided once on all samples by :func:`train`, not per
    step); an output whose metric is ``ignore`` (the user said it does not count) is
    left out."""
    specs = list(specs) or [None] * len(teacher)
    softmax = list(probabilities) or [None] * len(teacher)
    losses = [
        output_loss(s, t, spec, p)
        for s, t, spec, p in zip(student, teacher, specs, softmax, strict=True)
        if s.is_floating_point() and (spec is None or spec.kind != "ignore")
    ]
    if not losses:  # every output ignored: nothing to aim at
        return sum(s.sum() for s in student if s.is_floating_point()) * 0.0
    return torch.stack(losses).mean()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the teacher's mean square."""
    return torch.mean((student - teacher) ** 2) / (torch.mean(teacher**2) + 1e-12)


def output_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spec: MetricSpec | None = None,
    probabilities: bool | None = None,
) -> torch.Tensor:
    """What the output's task metric ``spec`` judges, as a loss: a detector head's
    :func:`detection_loss`; a segmenter's class scores (``pixels``) as class scores on
    their axis; masks, embeddings and other floats their mean squared error over the
    teacher's mean square. Class scores (``top1``, ``ctc``, ``steps``, or with no
    ``spec`` a last axis of at least :data:`CLASS_AXIS` values) take that error only
    over the teacher's top :data:`TOP_K` classes of each row, plus the cross-entropy of
    the student against the teacher's argmax: what decides the argmax (and a decoded
    text), not thousands of unlikely classes' logits. Measured on ddddocr's OCR: a plain
    MSE or KL fell 2-3x on held-out captchas while their decoded text did not move.
    Probabilities (a softmax's output: rows in [0, 1] summing to 1) are taken as their
    logs, which are logits (squeezed by :data:`LOGIT_EPS`, so an int8 0 keeps a
    gradient); taken as they were, magika's 214 probabilities gave a cross-entropy of 4.4
    for a model agreeing with its teacher on 97-98% of files. ``probabilities`` None:
    decided from ``teacher``."""
    kind = spec.kind if spec is not None else None
    if kind == "detections":
        return detection_loss(student, teacher, bool(spec.option("objectness")))
    if kind == "pixels":
        axis = spec.option("axis")
        student, teacher = student.movedim(axis, -1), teacher.movedim(axis, -1)
    elif kind is not None and kind not in CLASS_KINDS:
        return relative_mse(student, teacher)
    if student.dim() < 2 or (kind is None and student.shape[-1] < CLASS_AXIS):
        return relative_mse(student, teacher)
    if probabilities is None:
        probabilities = looks_like_probabilities(teacher.detach().numpy())
    if probabilities:  # a softmax's: its log is a logit
        student, teacher = (
            torch.log(LOGIT_EPS + (1 - LOGIT_EPS) * p.clamp(0, 1)) for p in (student, teacher)
        )
    top = teacher.topk(min(TOP_K, teacher.shape[-1]), dim=-1).indices
    mse = relative_mse(student.gather(-1, top), teacher.gather(-1, top))
    classes = student.shape[-1]
    labels = teacher.argmax(-1).reshape(-1)
    return mse + F.cross_entropy(student.reshape(-1, classes), labels)


def detection_loss(
    student: torch.Tensor, teacher: torch.Tensor, objectness: bool = False
) -> torch.Tensor:
    """A detector head's loss (see :mod:`~slimfleet.host.compress.detections` for the
    layouts): the error of the class scores in logits (smooth L1: half its square within
    one logit, linear beyond), over the scores either
    model puts at :data:`SCORE_FLOOR` or more (a detection appears or goes where a
    logit crosses the threshold's), plus the boxes' squared error over the teacher's
    mean square, each anchor weighted by the teacher's best score (a background
    anchor's box is never seen)."""
    if student.shape[-2] < student.shape[-1]:  # [N, 4 + C, A] -> [N, A, 4 + C]
        student, teacher = student.transpose(-1, -2), teacher.transpose(-1, -2)
    first = BOX_VALUES + int(objectness)
    scores = [m[..., first:] for m in (student, teacher)]
    if objectness:
        scores = [
            p * m[..., BOX_VALUES:first] for p, m in zip(scores, (student, teacher), strict=True)
        ]
    mine, theirs = scores
    live = torch.maximum(mine.detach(), theirs) >= SCORE_FLOOR
    # squeezed into (eps, 1 - eps), not clamped there: a score int8 put at exactly 0 or 1
    # still has a gradient (a learned scale can round past 1: clamped to [0, 1] first);
    # smooth L1 keeps a lost detection's 9 logits from swamping the rest
    squeezed = (LOGIT_EPS + (1 - 2 * LOGIT_EPS) * p.clamp(0, 1) for p in (mine, theirs))
    logits = [torch.logit(p) for p in squeezed]
    error = F.smooth_l1_loss(logits[0][live], logits[1][live]) if live.any() else None
    classes = error if error is not None else mine.sum() * 0
    weight = theirs.max(-1).values
    boxes = ((student[..., :BOX_VALUES] - teacher[..., :BOX_VALUES]) ** 2).mean(-1)
    scale = (weight.sum() + 1e-12) * (torch.mean(teacher[..., :BOX_VALUES] ** 2) + 1e-12)
    return classes + (weight * boxes).sum() / scale


def train(
    qdq: onnx.ModelProto,
    teacher: onnx.ModelProto,
    samples: Sequence[Feed],
    *,
    seconds: float,
    lr: float = 0.002,
    learn_scales: bool = True,
    max_steps: int = 0,
    batch: int = 4,
    features: float = 0.0,
    threads: int = 1,
    seed: int = 0,
    train_float: bool = False,
    metrics: Mapping[str, str] | None = None,
) -> TrainResult:
    """Fine-tune ``qdq`` against ``teacher`` on ``samples`` (see the module docstring).

    ``lr`` is Adam's learning rate in units of each weight's quantization step (scales
    are learned in log space at ``lr * SCALE_LR``); one step accumulates the gradients
    of ``batch`` samples. ``features`` > 0 adds that weight times the mean relative MSE
    of every weighted node's output against the teacher's (computed per step by
    onnxruntime, never stored; a pruned producer's output, narrower than the teacher's,
    is left out). ``train_float`` trains the float weights of a model without QDQ (a
    pruned one) instead: distillation. ``metrics``: the task metrics the user gave, which
    the loss aims at (:func:`loss_specs`). Raises ValueError when the graph holds an
    operator the interpreter cannot run.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    graph = QdqGraph(
        qdq, float_weights(teacher), learn_scales=learn_scales, train_float=train_float
    )
    taught = teacher_outputs(teacher, samples, threads)
    specs = loss_specs(teacher, taught, metrics)
    targets = [
        [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outs if o.dtype.kind == "f"]
        for outs in taught
    ]
    del taught
    softmax = [
        all(looks_like_probabilities(sample[k].numpy()) for sample in targets)
        for k in range(len(targets[0]))
    ]
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = min(MAX_HELD_OUT, len(order) // HELD_OUT_SHARE or (1 if len(order) > 1 else 0))
    held_out, train_ids = order[:held] or order, order[held:] or order
    groups = [{"params": list(graph.units.parameters()), "lr": lr}]
    if learn_scales and len(graph.logs):
        groups.append({"params": list(graph.logs.parameters()), "lr": lr * SCALE_LR})
    optimizer = torch.optim.Adam(groups)
    rates = [g["lr"] for g in groups]

    def feed(i: int) -> dict[str, torch.Tensor]:
        return {k: _input(v) for k, v in samples[i].items()}

    pairs = feature_names(qdq, teacher) if features > 0 else []
    if pairs:
        pairs = _same_shapes(graph, teacher, pairs, samples[0], threads)
    names = [student for student, _ in pairs]
    wanted_names = [name for _, name in pairs]
    inner = (
        open_session(with_outputs(teacher, wanted_names).SerializeToString(), threads)
        if pairs
        else None
    )
    outputs = len(graph.outputs)

    def train_loss(i: int) -> torch.Tensor:
        got = graph(feed(i), names)
        loss = distill_loss(_floats(got[:outputs]), targets[i], specs, softmax)
        if inner is None:
            return loss
        wanted = inner.run(wanted_names, dict(samples[i]))
        pairs = [(s, torch.from_numpy(t)) for s, t in zip(got[outputs:], wanted, strict=True)]
        return loss + features * torch.stack([relative_mse(s, t) for s, t in pairs]).mean()

    def evaluate() -> float:
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        float(distill_loss(_floats(graph(feed(i))), targets[i], specs, softmax))
                        for i in held_out
                    ]
                )
            )

    started = time.monotonic()
    result = TrainResult(qdq, label="distillation" if train_float else "QAT")
    best = evaluate()
    result.curve.append((0, 0.0, best))
    best_state = {k: v.detach().clone() for k, v in graph.state_dict().items()}
    every = max(seconds / CHECKPOINTS, 1e-3)
    every_steps = max(1, max_steps // CHECKPOINTS)
    next_check, step = started + every, 0
    while time.monotonic() - started < seconds and (not max_steps or step < max_steps):
        progress = step / max_steps if max_steps else (time.monotonic() - started) / seconds
        for group, base in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = base * schedule(progress)
        optimizer.zero_grad()
        graph.begin_step()
        for k in range(batch):  # gradients accumulated over ``batch`` samples
            i = train_ids[(step * batch + k) % len(train_ids)]
            loss = train_loss(i) / batch
            loss.backward()
        graph.end_step()
        if _finite_gradients(optimizer):
            optimizer.step()
        else:  # one overflowing sample must not turn every weight into NaN
            result.skipped += 1
        step += 1
        done = time.monotonic() - started >= seconds or step == max_steps
        due = step % every_steps == 0 if max_steps else time.monotonic() >= next_check
        if due or done:
            next_check = time.monotonic() + every
            current = evaluate()
            result.curve.append((step, time.monotonic() - started, current))
            log.info("QAT step %d: held-out loss %.5g", step, current)
            if current < best:
                best, result.best_step = current, step
                best_state = {k: v.detach().clone() for k, v in graph.state_dict().items()}
    graph.load_state_dict(best_state)
    result.model = graph.write_back() if result.best_step else qdq
    result.steps, result.seconds = step, time.monotonic() - started
    return result


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Every gradient the optimizer would apply is finite."""
    return all(
        bool(torch.isfinite(p.grad).all())
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    )


def schedule(progress: float) -> float:
    """Share of the learning rate at ``progress`` (0..1) of the budget."""
    if progress < WARMUP:
        return progress / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (progress - WARMUP) / (1 - WARMUP)))


def _input(value: np.ndarray) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype.kind == "f":
        return torch.from_numpy(array.astype(np.float32))
    return torch.from_numpy(array.astype(np.int64))


def _floats(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [o for o in outputs if o.is_floating_point()]


def max_difference(
    graph_model: onnx.ModelProto, feed: Mapping[str, np.ndarray], reference: Sequence[np.ndarray]
) -> float:
    """Largest absolute difference between the interpreter's outputs and ``reference``."""
    graph = QdqGraph(graph_model)
    with torch.no_grad():
        outputs = graph({k: _input(v) for k, v in feed.items()})
    return max(
        float(np.max(np.abs(o.numpy().astype(np.float64) - np.asarray(r, dtype=np.float64))))
        for o, r in zip(outputs, reference, strict=True)
    )
