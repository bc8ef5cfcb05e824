"""Pass ``quantize_static``: int8 QDQ with activation ranges calibrated on the user's samples.

Wraps ``onnxruntime.quantization.quantize_static`` (QDQ format) after
``quant_pre_process``. Per-channel weights need per-axis DequantizeLinear, which
exists from opset 13: :meth:`QuantizeStatic.min_opset` tells the runner to upgrade.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    quantize_static,
)
from onnxruntime.quantization.calibrate import HistogramCalibrater, MinMaxCalibrater
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from slimfleet.host.compress.modelfile import opset
from slimfleet.host.compress.planning import batch_bytes
from slimfleet.host.compress.tensorsizes import activation_bytes
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Feed, Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins import quantization as q
from slimfleet.plugins.onnxgraph import (
    describe_counts,
    error_line,
    has_subgraphs,
    multiply_accumulates,
)
from slimfleet.plugins.outputranges import MIXED_RANGE, mixed_output_tails
from slimfleet.plugins.precision import (
    CANCELLATION,
    cancellation_regions,
    cancelling_nodes,
    singular_chains,
)
from slimfleet.plugins.sentinels import WHAT, SentinelWatch, constant_readers, keep_float, shown

SUPPORTED = tuple(sorted({*QDQRegistry, *QLinearOpsRegistry}))
"""What quantize_static picks when op_types is empty (its own default)."""
CALIBRATION = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
MIN_MAX_OUTPUTS = ("_ReduceMin", "_ReduceMax")
"""What onnxruntime's min-max calibrator appends to the tensors it reads."""
PER_AXIS_OPSET = 13
QDQ_OPSET = 10


class FeedReader(CalibrationDataReader):
    """Hands the calibration feeds to onnxruntime one at a time (read from disk as it
    asks for them when ``feeds`` is lazy)."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = feeds
        self._next = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._feeds)


class _Chunk(CalibrationDataReader):
    """At most ``size`` feeds of ``reader``, starting with ``first``."""

    def __init__(self, reader: CalibrationDataReader, first: Feed, size: int) -> None:
        self._reader, self._pending, self._left = reader, first, size

    def get_next(self) -> Feed | None:
        if self._left <= 0:
            return None
        self._left -= 1
        if self._pending is not None:
            feed, self._pending = self._pending, None
            return feed
        return self._reader.get_next()


@contextlib.contextmanager
def calibrating(size: int, watch: list[SentinelWatch]) -> Iterator[None]:
    """Make onnxruntime's calibrators reduce every ``size`` samples, and watch what they
    see for values int8 cannot carry.

    As shipped, its histogram calibrators (percentile, entropy) keep every intermediate
    output of every calibration sample until the end: 64 samples of a 3x640x640 detector
    are tens of GB. Their ``collect_data`` merges into what earlier calls collected
    (histograms, min/max ranges), so calling it on chunks gives the same result with
    one chunk in memory. The calibrator's session is wrapped in a
    :class:`~slimfleet.plugins.sentinels.SentinelWatch`, appended to ``watch``. Patches
    the classes for the duration (passes run one at a time, each in its own process).
    """
    saved = {cls: cls.collect_data for cls in (HistogramCalibrater, MinMaxCalibrater)}

    def chunked(original: Any) -> Any:
        def collect_data(self: Any, reader: CalibrationDataReader) -> None:
            if not isinstance(self.infer_session, SentinelWatch):
                reduced = MIN_MAX_OUTPUTS if isinstance(self, MinMaxCalibrater) else ()
                self.infer_session = SentinelWatch(self.infer_session, reduced)
                watch.append(self.infer_session)
            while (first := reader.get_next()) is not None:
                original(self, _Chunk(reader, first, size))

        return collect_data

    for cls, original in saved.items():
        cls.collect_data = chunked(original)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.collect_data = original  # type: ignore[method-assign]


def chunk_size(model: onnx.ModelProto, calibration: Sequence[Feed], memory: int | None) -> int:
    """Calibration samples whose intermediate outputs fit a quarter of ``memory``."""
    if not calibration:
        return 1
    per_sample = max(1, activation_bytes(model, calibration[0]))
    return max(1, min(len(calibration), batch_bytes(memory) // per_sample))


class QuantizeStatic(Pass):
    name = "quantize_static"
    description = (
        "int8 QDQ weights and activations with ranges calibrated on the calibration "
        "samples (onnxruntime quantize_static); fast Conv/MatMul kernels on CPU"
    )
    options = (
        q.op_types_option(SUPPORTED),
        Option(
            "per_channel",
            bool,
            True,
            "one scale per output channel of each weight (needs opset 13, upgraded first)",
        ),
        Option(
            "calibration",
            str,
            "minmax",
            "how activation ranges are chosen from the samples",
            choices=tuple(CALIBRATION),
        ),
        Option(
            "activation_type",
            str,
            "uint8",
            "8-bit type of activations",
            choices=("uint8", "int8"),
        ),
        Option(
            "percentile",
            float,
            99.999,
            "with calibration=percentile: the percentile of absolute activations kept in range",
        ),
        Option("weight_type", str, "int8", "8-bit type of weights", choices=("int8", "uint8")),
        q.EXCLUDE_NODES,
        Option(
            "reduce_range",
            bool,
            False,
            "7-bit weights, for CPUs without VNNI where 8-bit products can saturate",
        ),
        Option(
            "mac_share",
            float,
            1.0,
            "quantize only the heaviest Conv/Gemm/MatMul nodes that together do this share "
            "of their multiply-accumulates (measured on a calibration sample); the light "
            "ones, often the sensitive ones, stay in float (1: all)",
        ),
        Option(
            "precision",
            bool,
            True,
            "keep float what int8 cannot compute with: the terms of a difference 16x "
            "smaller than them, and what a reciprocal, division or log reads",
        ),
        Option(
            "preprocess",
            bool,
            True,
            "run onnxruntime's quant_pre_process shape inference first",
        ),
    )

    def min_opset(self, options: dict[str, Any]) -> int:
        return PER_AXIS_OPSET if options["per_channel"] else QDQ_OPSET

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        if not 0 < options["percentile"] <= 100:
            return f"percentile {options['percentile']} is not in (0, 100]"
        if not 0 < options["mac_share"] <= 1:
            return f"mac_share {options['mac_share']} is not in (0, 1]"
        if not context.calibration:
            return "needs calibration data"
        need, have = self.min_opset(options), opset(model)
        if have < need:
            what = "per-channel QDQ" if options["per_channel"] else "QDQ"
            return f"{what} needs opset {need}, the model has {have}"
        return q.targets(model, options["op_types"], SUPPORTED, options["exclude_nodes"])[1]

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        notes: list[str] = []
        excluded = list(options["exclude_nodes"])
        if masked := [n for n in constant_readers(model) if n not in excluded]:
            excluded += masked
            notes.append(
                f"left {len(masked)} nodes reading a constant mask in float ({WHAT}): "
                + shown(masked)
            )
        if options["mac_share"] < 1:
            excluded += _light_nodes(model, context, options, notes)

        chunk = chunk_size(model, context.calibration, context.memory)
        if chunk < len(context.calibration):
            notes.append(f"calibrated in chunks of {chunk} samples to bound memory")

        watch: list[SentinelWatch] = []

        def quantize(source: Path, target: Path) -> None:
            prepared = _preprocess(source, notes) if options["preprocess"] else source
            with calibrating(chunk, watch):
                quantize_static(
                    prepared,
                    target,
                    FeedReader(context.calibration),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=options["op_types"] or None,
                    per_channel=options["per_channel"],
                    reduce_range=options["reduce_range"],
                    activation_type=q.quant_type(options["activation_type"]),
                    weight_type=q.quant_type(options["weight_type"]),
                    nodes_to_exclude=excluded,
                    calibrate_method=CALIBRATION[options["calibration"]],
                    extra_options={"CalibPercentile": options["percentile"]},
                )

        quantized = q.run_quantizer(model, context, self.name, quantize)
        if kept := keep_float(quantized, {n for w in watch for n in w.names}):
            notes.append(
                f"kept {len(kept)} activations in float: they hold values int8 cannot "
                f"carry (masks: {WHAT}): " + shown(kept)
            )
        if tails := keep_float(quantized, mixed_output_tails(quantized), shared=False):
            notes.append(
                f"kept {len(tails)} output tensors in float: they join parts whose ranges "
                f"differ {MIXED_RANGE:g}x or more (a detector's boxes and scores): " + shown(tails)
            )
        if options["precision"]:
            notes += _keep_precision(model, quantized, context)
        method = options["calibration"]
        if method == "percentile":
            method += f" {options['percentile']:g}"
        summary = (
            f"QDQ, {'per-channel ' if options['per_channel'] else ''}{options['weight_type']} weights, "
            f"{options['activation_type']} activations, {method} on {len(context.calibration)} samples"
        )
        result = q.result(model, quantized, summary, options["exclude_nodes"])
        result.notes = "; ".join([result.notes, *notes])
        return result


def _keep_precision(
    model: onnx.ModelProto, quantized: onnx.ModelProto, context: PassContext
) -> list[str]:
    """Keep float in ``quantized`` what a cancelling difference or a singular op reads
    (see :mod:`~slimfleet.plugins.precision`); the notes saying so. Best effort: a
    failure to measure is a note, never a failed pass."""
    if has_subgraphs(model):
        return [
            "precision rules not applied: the model has subgraphs, whose readers they do not see"
        ]
    notes = []
    try:
        rounded = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
        cancelling = cancelling_nodes(
            model, context.calibration, context.threads, context.memory, rounded
        )
    except Exception as exc:  # onnxruntime on the model with more outputs: whatever it raises
        notes.append(f"cancelling differences not measured: {error_line(exc)}")
        cancelling = []
    regions = [region for region in cancellation_regions(model, cancelling) if region]
    if terms := keep_float(quantized, set().union(*regions), shared=False):
        notes.append(
            f"kept {len(terms)} tensors in float: they feed {len(regions)} "
            f"difference{'s' * (len(regions) != 1)}, each {CANCELLATION:g}x or more "
            "smaller than its terms (a variance as E[x^2] - E[x]^2): " + shown(terms)
        )
    if singular := keep_float(quantized, singular_chains(model), shared=False):
        notes.append(
            f"kept {len(singular)} tensors in float: a reciprocal, division or log reads "
            "them (rounded to 0, they make infinities): " + shown(singular)
        )
    return notes


def _light_nodes(
    model: onnx.ModelProto, context: PassContext, options: dict[str, Any], notes: list[str]
) -> list[str]:
    """Names of the weighted nodes left out by ``mac_share`` (lightest first out)."""
    wanted = set(options["op_types"] or SUPPORTED)
    kinds = {n.name: n.op_type for n in model.graph.node if n.op_type in wanted}
    macs = multiply_accumulates(model, context.calibration[0])
    macs = {
        name: m
        for name, m in macs.items()
        if name in kinds and name not in options["exclude_nodes"]
    }
    if not macs:
        notes.append("mac_share ignored: no weighted node with known shapes")
        return []
    heaviest = sorted(macs, key=macs.__getitem__, reverse=True)
    total, done, keep = sum(macs.values()), 0, 0
    while done < options["mac_share"] * total:
        done += macs[heaviest[keep]]
        keep += 1
    light = heaviest[keep:]
    ops = describe_counts(Counter(kinds[n] for n in light))
    notes.append(
        f"left the {len(light)} lightest weighted nodes in float ({ops}; "
        f"{1 - done / total:.0%} of their multiply-accumulates)"
    )
    return light


def _preprocess(source: Path, notes: list[str]) -> Path:
    """Shape inference by quant_pre_process on ``source``; without its symbolic part when
    that fails, and not at all when both fail (noted). Its optimizer is skipped: it
    would rename fused nodes, and ``exclude_nodes`` must name what the caller sees."""
    target = source.with_name(source.stem + "_pre.onnx")
    try:
        quant_pre_process(str(source), str(target), skip_optimization=True)
        return target
    except Exception as exc:  # symbolic shape inference fails on many real models
        first = error_line(exc)
    try:
        quant_pre_process(
            str(source), str(target), skip_optimization=True, skip_symbolic_shape=True
        )
        notes.append(f"pre-processed without symbolic shape inference ({first})")
        return target
    except Exception as exc:  # onnx shape inference or the optimizer failed as well
        notes.append(f"skipped pre-processing ({error_line(exc)})")
        return source


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``quantize_static`` pass."""
    passes.add(QuantizeStatic())
