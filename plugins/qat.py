"""Pass ``qat``: static int8 QDQ, then quantization-aware training distilled from the float model.

Opt-in (extra ``train``: torch). It quantizes like ``quantize_static`` (same options),
then fine-tunes the QDQ model's weights, biases and (``learn_scales``) scales for
``seconds`` of wall time under onnxruntime-exact fake quantization, with the float
model it was given as the teacher on the calibration samples (no labels), and writes
the trained integers and scales back into the QDQ graph (see
:mod:`slimfleet.host.compress.recovery`). The search runs it only when every
post-training candidate missed the budget and ``--train-budget`` is given. Its loss
curve is in the step's notes and in the report's "Accuracy recovery" section.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import onnx

from slimfleet.host.compress.retrain import BUDGETED_PASSES
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.host.sections import ReportSection
from slimfleet.plugins.onnxgraph import error_line
from slimfleet.plugins.quantize_static import QuantizeStatic

NAME = "qat"
MISSING_TORCH = "needs torch: pip install 'slimfleet[train]'"
TRAIN_OPTIONS = ("seconds", "lr", "learn_scales", "max_steps", "features")
CURVE = re.compile(
    r"(?:QAT|distillation) (\d+) steps in (\d+) s: held-out loss (\S+) -> (\S+) .*curve ([^)]*)\)"
)


class QuantizationAwareTraining(Pass):
    name = NAME
    description = (
        "static int8 QDQ, then quantization-aware training against the float model on "
        "the calibration samples (onnxruntime-exact fake quantization; needs torch)"
    )
    options = (
        *QuantizeStatic.options,
        Option("seconds", float, 600.0, "wall time of the training loop (--train-budget)"),
        Option(
            "lr",
            float,
            0.002,
            "Adam's learning rate: weights move in units of their quantization step, "
            "scales in log space",
        ),
        Option("learn_scales", bool, True, "learn weight and activation scales too (LSQ)"),
        Option("max_steps", int, 0, "stop after this many steps (0: only the time limit)"),
        Option(
            "features",
            float,
            0.0,
            "weight of distilling every Conv/Gemm/MatMul output too, not only the "
            "model's outputs (0: off; 1 took ddddocr's OCR from 0.71 to 0.76 of texts, "
            "but hurt a small outlier-heavy MLP)",
        ),
    )

    def __init__(self) -> None:
        self.static = QuantizeStatic()

    def min_opset(self, options: dict[str, Any]) -> int:
        return self.static.min_opset(options)

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return MISSING_TORCH
        if options["seconds"] <= 0 or options["lr"] <= 0:
            return "seconds and lr must be positive"
        if options["max_steps"] < 0 or options["features"] < 0:
            return "max_steps and features must be at least 0"
        from slimfleet.host.compress.qdqtorch import unsupported

        missing = unsupported(model)
        if missing:
            return f"operator {missing[0]} is not supported by the QAT interpreter"
        return self.static.check(model, context, _static(options))

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        from slimfleet.host.compress.recovery import train

        start = self.static.apply(model, context, _static(options))
        if not start.changed:
            return start
        try:
            trained = train(
                start.model,
                model,
                context.calibration,
                seconds=options["seconds"],
                lr=options["lr"],
                learn_scales=options["learn_scales"],
                max_steps=options["max_steps"],
                features=options["features"],
                threads=context.threads,
                metrics=context.metrics,
            )
        except Exception as exc:  # an operator form the interpreter refuses, or its bug
            reason = error_line(exc)
            context.log.warning("qat: training failed, kept the post-training model: %s", reason)
            return PassResult(start.model, True, f"{start.notes}; QAT failed: {reason}")
        return PassResult(trained.model, True, f"{start.notes}; {trained.summary()}")


def _static(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in TRAIN_OPTIONS}


def loss_curves(report: dict[str, Any]) -> dict[str, Any]:
    """The loss curve of every candidate that trained (QAT, or distillation after
    pruning), by candidate label."""
    curves = {}
    for candidate in report.get("candidates", []):
        for step in candidate.get("steps", []):
            trains = step.get("pass") in BUDGETED_PASSES
            found = CURVE.search(step.get("notes", "")) if trains else None
            if found:
                steps, seconds, first, best, curve = found.groups()
                curves[f"#{candidate['id']} {candidate['label']}"] = {
                    "steps": int(steps),
                    "seconds": int(seconds),
                    "held_out_loss": [float(first), float(best)],
                    "curve": [[int(s), float(v)] for s, v in (p.split(":") for p in curve.split())],
                    "status": candidate.get("status"),
                }
    return curves


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the opt-in ``qat`` pass."""
    passes.add(QuantizationAwareTraining())


@hookimpl
def slimfleet_report_section(report: dict[str, Any]) -> ReportSection | None:
    """The loss curves of the candidates ``qat`` trained ("Accuracy recovery")."""
    curves = loss_curves(report)
    if not curves:
        return None
    return ReportSection(
        "Accuracy recovery",
        "Training against the float model (quantization-aware training, or distillation "
        "after pruning): held-out distillation loss (step: loss) from the post-training or "
        "refitted model (step 0) to the weights kept.",
        curves,
    )
