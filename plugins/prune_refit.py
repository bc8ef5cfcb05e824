"""Pass ``prune_refit``: structured channel pruning, then a least-squares refit.

Removes the output channels with the smallest L2 norm from each Conv and Gemm/MatMul
producer (``ratio`` of them, keeping at least ``min_channels``), with the matching
input channels of every consumer (through BatchNorm, channel-wise ops, per-channel
Mul/Add, global pooling + Flatten; the path is :func:`slimfleet.plugins.prune.channel_step`).
Then each consumer's weights and bias are refitted in closed form (ridge-regularised
least squares towards its pruned weights) so that its output on the calibration
samples matches the unpruned model's: this recovers most of what pruning loses,
without training. A producer whose channels reach something that cannot be followed
(Reshape, Concat, a graph output, a shared parameter) is left alone, with a reason.

Bounds: the refit samples at most ``MAX_ROWS`` rows (samples x positions) per
consumer and solves one ``d x d`` system per consumer (d = its kept inputs x kernel
size); ``MAX_FEATURES`` caps d, a bigger consumer is pruned but not refitted. It holds
one consumer's input and output on all calibration samples at a time (two onnxruntime
passes over them per consumer).
With ``seconds`` > 0 (needs torch, extra ``train``) the refitted model is then
distilled from the unpruned one for that long: its float Conv/Gemm/MatMul weights and
biases are trained on the calibration samples against the original's outputs and, with
``features``, against the outputs of every weighted node whose shape pruning kept (the
QAT pass's loop, :func:`slimfleet.host.compress.recovery.train`; the weights with the
lowest held-out loss are kept, so it never returns a model worse on that loss than the
refit). Its loss curve is in the step's notes and the report.
Opt-in only (``--passes prune_refit``); it is not in any default recipe.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.modelfile import with_outputs
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins.normalize import infer_shapes
from slimfleet.plugins.onnxgraph import consumers, copy_model, error_line, float_attr
from slimfleet.plugins.prune import CHANNEL_WISE, ChannelCut, channel_step, int_attr, shorten
from slimfleet.plugins.qat import MISSING_TORCH

PRODUCERS = ("Conv", "Gemm", "MatMul")
MAX_ROWS = 8_192
"""Rows (samples x output positions) one consumer's refit reads at most (with
``MAX_FEATURES`` columns: 128 MiB of float32 patches)."""
MAX_GROUP = 16
"""Producers cut alike because residual Adds join their outputs, at most."""
CHUNK = 1_024
"""Rows converted to float64 at a time when summing the normal equations."""
MAX_FEATURES = 4_096
"""Columns (kept input channels x kernel size) of one consumer's refit at most."""
RIDGE = 1e-3
"""Regularisation, relative to the mean diagonal of the normal equations."""


class PruneRefit(Pass):
    name = "prune_refit"
    description = (
        "Structured pruning of Conv/Gemm/MatMul output channels by L2 norm, then a "
        "least-squares refit of each consumer on the calibration samples (opt-in)"
    )
    options = (
        Option("ratio", float, 0.25, "share of output channels removed per layer, 0..1"),
        Option("min_channels", int, 1, "never keep fewer channels than this in a layer"),
        Option("layers", str, "Conv,Gemm,MatMul", "comma-separated producer ops to prune"),
        Option("seconds", float, 0.0, "then distil from the original for this long (0: off)"),
        Option("lr", float, 0.02, "distillation's Adam rate, in units of max|w|/127"),
        Option("features", float, 1.0, "weight of the kept nodes' outputs in the loss"),
    )

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        if not 0.0 < options["ratio"] < 1.0:
            return f"ratio {options['ratio']} is not between 0 and 1"
        if options["min_channels"] < 1:
            return f"min_channels {options['min_channels']} is below 1"
        bad = [op for op in _layers(options) if op not in PRODUCERS]
        if bad or not _layers(options):
            return f"layers {options['layers']!r}: use some of {', '.join(PRODUCERS)}"
        if not context.calibration:
            return "needs calibration samples for the refit"
        if options["seconds"] < 0 or options["lr"] <= 0 or options["features"] < 0:
            return "seconds and features must be at least 0, lr positive"
        if options["seconds"] > 0:
            if importlib.util.find_spec("torch") is None:
                return MISSING_TORCH
            from slimfleet.host.compress.qdqtorch import unsupported

            missing = unsupported(model)
            if missing:
                return f"operator {missing[0]} is not supported by the distillation interpreter"
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        out = copy_model(model)
        cuts, refit, skipped = _plan(out.graph, options)
        if not cuts:
            why = f": {shorten(', '.join(skipped))}" if skipped else ""
            return PassResult(copy_model(model), False, f"changed nothing, nothing to prune{why}")
        inits = {t.name: t for t in out.graph.initializer}
        for cut in cuts:
            for name, axis in cut.slices:
                array = np.delete(numpy_helper.to_array(inits[name]), cut.drop, axis=axis)
                inits[name].CopyFrom(numpy_helper.from_array(array, name))
        del out.graph.value_info[:]
        out, failure = infer_shapes(out)
        fitted, unfitted = _refit_all(model, out, refit, context)
        removed, total = sum(len(c.drop) for c in cuts), sum(c.channels for c in cuts)
        detail = ", ".join(f"{c.conv} {c.channels}->{c.channels - len(c.drop)}" for c in cuts)
        notes = [f"removed {removed} of {total} output channels: {shorten(detail)}"]
        notes.append(f"refitted {fitted} of {len(refit)} consumers by least squares")
        if unfitted:
            notes.append(f"not refitted: {shorten(', '.join(unfitted))}")
        if skipped:
            notes.append(f"left {len(skipped)} as they were: {shorten(', '.join(skipped))}")
        if failure:
            notes.append(failure)
        if options["seconds"] > 0:
            out = _distill(out, model, context, options, notes)
        return PassResult(out, True, "; ".join(notes))


def _distill(
    pruned: onnx.ModelProto,
    teacher: onnx.ModelProto,
    context: PassContext,
    options: dict[str, Any],
    notes: list[str],
) -> onnx.ModelProto:
    """``pruned`` distilled from ``teacher`` (see the module docstring); on a failure, the
    refitted model as it was, with the reason in ``notes``."""
    from slimfleet.host.compress.recovery import train

    try:
        trained = train(
            pruned,
            teacher,
            context.calibration,
            seconds=options["seconds"],
            lr=options["lr"],
            features=options["features"],
            threads=context.threads,
            metrics=context.metrics,
            train_float=True,
        )
    except Exception as exc:  # an operator form the interpreter refuses, or its bug
        reason = error_line(exc)
        context.log.warning("prune_refit: distillation failed, kept the refit: %s", reason)
        notes.append(f"distillation failed: {reason}")
        return pruned
    notes.append(trained.summary())
    return trained.model


def _layers(options: dict[str, Any]) -> list[str]:
    return [op.strip() for op in options["layers"].split(",") if op.strip()]


def _plan(
    graph: onnx.GraphProto, options: dict[str, Any]
) -> tuple[list[ChannelCut], list[onnx.NodeProto], list[str]]:
    """The cuts to make, the consumers to refit after them, and the producers left alone
    (with why). A node is cut at most once: as a producer or as a consumer, not both."""
    inits = {t.name: t for t in graph.initializer}
    uses = {name: len(r) for name, r in consumers(graph).items()}
    layers = _layers(options)
    cuts, refit, skipped, touched, partners = [], [], [], set(), set()
    for position, node in enumerate(graph.node):
        if node.op_type not in layers or len(node.input) < 2 or node.input[1] not in inits:
            continue
        label = _label(node)
        if id(node) in partners:
            continue  # cut with a residual partner already
        cut, readers, group, why = _plan_one(graph, position, inits, options)
        if cut is not None:
            shared = [n for n, _ in cut.slices if uses.get(n, 0) > 1]
            overlap = {id(n) for n in group} | {id(r) for r in readers}
            if shared:
                cut, why = None, f"parameter {shared[0]} is shared with other nodes"
            elif overlap & touched:
                cut, why = None, "its weights are already cut by a neighbour's pruning"
            else:
                touched |= overlap
                partners |= {id(n) for n in group}
        if cut is None:
            skipped.append(f"{label} ({why})")
            continue
        cuts.append(cut)
        refit += readers
    return cuts, refit, skipped


def _plan_one(
    graph: onnx.GraphProto,
    position: int,
    inits: dict[str, onnx.TensorProto],
    options: dict[str, Any],
) -> tuple[ChannelCut | None, list[onnx.NodeProto], list[onnx.NodeProto], str]:
    """The cut of the producer at ``position`` (with the producers of the other branches
    of residual Adds it meets, cut alike), the consumers reading its channels, the
    producers cut, or why it cannot be pruned."""
    group = [position]
    while True:
        cut, readers, partner, why = _propagate(graph, group, inits, options)
        if partner is None or partner in group or len(group) >= MAX_GROUP:
            return cut, readers, [graph.node[p] for p in group], why
        group.append(partner)


def _producer(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
) -> tuple[int, str, np.ndarray, list[tuple[str, int]], str]:
    """(output channel axis, layout, channel norms, slices) of a producer, or why not."""
    weights = numpy_helper.to_array(inits[node.input[1]])
    if node.op_type == "Conv":
        if int_attr(node, "group", 1) != 1:
            return 0, "", weights, [], "grouped Conv"
        axis, layout = 0, "spatial"
    elif weights.ndim != 2 or (node.op_type == "Gemm" and int_attr(node, "transA", 0)):
        return 0, "", weights, [], "not a plain 2-D weight"
    else:
        axis, layout = (0 if int_attr(node, "transB", 0) else 1), "flat"
    count = weights.shape[axis]
    norms = np.sqrt((np.moveaxis(weights, axis, 0).reshape(count, -1) ** 2).sum(axis=1))
    slices = [(node.input[1], axis)]
    if len(node.input) > 2 and node.input[2]:
        bias = inits.get(node.input[2])
        if bias is None or list(bias.dims) != [count]:
            return 0, "", norms, [], "its bias is not a constant vector per channel"
        slices.append((node.input[2], 0))
    return axis, layout, norms, slices, ""


def _propagate(
    graph: onnx.GraphProto,
    group: list[int],
    inits: dict[str, onnx.TensorProto],
    options: dict[str, Any],
) -> tuple[ChannelCut | None, list[onnx.NodeProto], int | None, str]:
    """Cut the producers at ``group`` alike and follow their channels: (cut, readers,
    None, "") or (None, [], partner, why), partner being the producer of a residual
    Add's other branch when that is what stopped it."""
    nodes = list(graph.node)
    region, slices, total = {}, [], None
    for position in group:
        _, layout, norms, cuts, why = _producer(nodes[position], inits)
        if why or (total is not None and len(norms) != len(total)):
            return None, [], None, why or "residual branches of different widths"
        region[nodes[position].output[0]] = layout
        slices += cuts
        total = norms if total is None else total + norms
    count = len(total)
    k = min(int(count * options["ratio"]), count - options["min_channels"])
    if k <= 0:
        return None, [], None, f"only {count} channels"
    label = "+".join(_label(nodes[p]) for p in group)
    cut = ChannelCut(label, count, np.sort(np.argsort(total)[:k]), slices)
    outputs = {o.name for o in graph.output}
    readers = []
    for position in range(min(group) + 1, len(nodes)):
        node = nodes[position]
        inside = [i for i, name in enumerate(node.input) if name in region]
        if not inside or position in group:
            if inside:
                return None, [], None, f"{_label(node)} reads channels it produces"
            continue
        before = len(cut.slices)
        after, why = channel_step(node, inside, region[node.input[inside[0]]], region, cut, inits)
        if why:
            partner = _partner(nodes, position, inside, inits, options)
            return None, [], partner, why
        if after is None and len(cut.slices) > before:
            readers.append(node)
        if after is not None:
            region[node.output[0]] = after
    if any(name in outputs for name in region):
        return None, [], None, "its channels reach a graph output"
    return cut, readers, None, ""


def _partner(
    nodes: list[onnx.NodeProto],
    position: int,
    inside: list[int],
    inits: dict[str, onnx.TensorProto],
    options: dict[str, Any],
) -> int | None:
    """The producer of the other branch of the residual Add at ``position``, reached back
    through channel-wise ops and BatchNormalization, or None."""
    node = nodes[position]
    if node.op_type != "Add" or len(node.input) != 2 or len(inside) != 1:
        return None
    name = node.input[1 - inside[0]]
    made = {o: i for i, n in enumerate(nodes) for o in n.output}
    while name in made:
        source = nodes[made[name]]
        if source.op_type in _layers(options) and source.input[1] in inits:
            return made[name]
        if source.op_type not in CHANNEL_WISE | {"BatchNormalization"}:
            return None
        name = source.input[0]
    return None


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _refit_all(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    readers: list[onnx.NodeProto],
    context: PassContext,
) -> tuple[int, list[str]]:
    """Refit the consumers in graph order, each on the inputs the already refitted
    model gives it, towards the original model's outputs of that node."""
    order = {n.output[0]: i for i, n in enumerate(pruned.graph.node)}
    readers = sorted(readers, key=lambda n: order[n.output[0]])
    inits = {t.name: t for t in pruned.graph.initializer}
    fitted, unfitted = 0, []
    for reader in readers:  # one value of one node in memory at a time
        node = next(n for n in pruned.graph.node if n.output[0] == reader.output[0])
        target = _values(original, [node.output[0]], context)[node.output[0]]
        feeds = _values(pruned, [node.input[0]], context)[node.input[0]]
        try:
            why = _refit(node, inits, feeds, target)
        except np.linalg.LinAlgError as exc:
            why = f"least squares failed: {exc}"
        if why:
            unfitted.append(f"{node.name or node.output[0]} ({why})")
        else:
            fitted += 1
    return fitted, unfitted


def _values(
    model: onnx.ModelProto, names: list[str], context: PassContext
) -> dict[str, np.ndarray]:
    """The values ``names`` on every calibration sample, concatenated on axis 0."""
    session = open_session(with_outputs(model, names).SerializeToString(), context.threads)
    runs = [session.run(names, feed) for feed in context.calibration]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def _refit(
    node: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    x: np.ndarray,
    y: np.ndarray,
) -> str:
    """Solve for ``node``'s weights (and bias) so that it maps ``x`` to ``y``; "" or why not."""
    weights = numpy_helper.to_array(inits[node.input[1]])
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias_name and bias_name not in inits:
        return "its bias is not a constant"
    if node.op_type == "Conv":
        columns, rows, why = _conv_rows(node, x, y, weights.shape)
        if why:
            return why
        start = weights.reshape(weights.shape[0], -1).T
    else:
        if node.op_type == "Gemm" and (
            int_attr(node, "transA", 0)
            or float_attr(node, "alpha", 1.0) != 1.0
            or float_attr(node, "beta", 1.0) != 1.0
        ):
            return "Gemm with transA, alpha or beta"
        transposed = node.op_type == "Gemm" and int_attr(node, "transB", 0)
        start = weights.T if transposed else weights
        columns, rows = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if columns.shape[1] + 1 > MAX_FEATURES:
        return f"{columns.shape[1]} inputs exceed {MAX_FEATURES}"
    bias = numpy_helper.to_array(inits[bias_name]) if bias_name else None
    if bias is not None and bias.size != start.shape[1]:
        return "its bias is not one per output"
    pick = np.random.default_rng(0).permutation(len(columns))[:MAX_ROWS]
    solution = _ridge(columns[pick], rows[pick], start, bias)
    new = solution[: start.shape[0]]
    new = new.T.reshape(weights.shape) if node.op_type == "Conv" else (new.T if transposed else new)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(new.astype(weights.dtype), node.input[1]))
    if bias is not None:
        fitted = solution[-1].reshape(bias.shape).astype(bias.dtype)
        inits[bias_name].CopyFrom(numpy_helper.from_array(fitted, bias_name))
    return ""


def _ridge(x: np.ndarray, y: np.ndarray, start: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """argmin |[x 1] w - y|^2 + lam |w - [start; bias]|^2, in float64 (bias row last)."""
    prior = start.astype(np.float64)
    if bias is not None:
        x = np.hstack([x, np.ones((len(x), 1), x.dtype)])
        prior = np.vstack([prior, bias.reshape(1, -1)])
    gram, moment = np.zeros((x.shape[1],) * 2), np.zeros(prior.shape)
    for at in range(0, len(x), CHUNK):  # float64 sums without a float64 copy of x
        part, target = x[at : at + CHUNK].astype(np.float64), y[at : at + CHUNK]
        gram += part.T @ part
        moment += part.T @ target.astype(np.float64)
    lam = RIDGE * max(float(np.trace(gram)) / len(gram), 1e-12)
    return np.linalg.solve(gram + lam * np.eye(len(gram)), moment + lam * prior)


def _conv_rows(
    node: onnx.NodeProto, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, str]:
    """im2col of a 2-D Conv: (positions, in x kh x kw) patches and (positions, out) outputs."""
    if len(shape) != 4:
        return x, y, "not a 2-D Conv"
    if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in node.attribute):
        return x, y, "auto_pad"
    ints = {a.name: list(a.ints) for a in node.attribute}
    if any(d != 1 for d in ints.get("dilations", [1, 1])):
        return x, y, "dilated Conv"
    top, left, bottom, right = ints.get("pads", [0, 0, 0, 0])
    sh, sw = ints.get("strides", [1, 1])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, shape[2:], axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw][:, :, : y.shape[2], : y.shape[3]]
    count, _, height, width = y.shape
    pick = np.random.default_rng(0).permutation(count * height * width)[:MAX_ROWS]
    n, i, j = np.unravel_index(pick, (count, height, width))
    columns = windows[n, :, i, j].reshape(len(pick), -1)  # never the whole im2col
    return columns, y[n, :, i, j], ""


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the opt-in ``prune_refit`` pass."""
    passes.add(PruneRefit())
