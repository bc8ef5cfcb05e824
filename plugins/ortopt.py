"""Pass ``ortopt``: onnxruntime's graph optimizations, applied once and saved offline."""

from __future__ import annotations

from typing import Any

import onnx
import onnxruntime as ort

from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.runtime import session_options
from slimfleet.host.compress.modelfile import DEFAULT_DOMAINS
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins.onnxgraph import (
    copy_model,
    describe_change,
    error_line,
)

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtOptimize(Pass):
    name = "ortopt"
    description = (
        "Save onnxruntime's graph optimizations offline (level basic is portable and "
        "lossless; extended/all add onnxruntime contrib ops tied to the CPU provider)"
    )
    lossless = True

    def is_lossless(self, options: dict[str, Any]) -> bool:
        """Only ``basic`` keeps standard ops and exact numerics; fusions may round differently."""
        return options["level"] == "basic"

    """At the default level ``basic``; recipes using extended/all should count as lossy."""
    options = (
        Option(
            "level",
            str,
            "basic",
            "basic: constant folding and redundant-node removal, standard ops only; "
            "extended: adds fusions into onnxruntime contrib ops; all: adds CPU layout "
            "changes (NCHWc), only for the same onnxruntime on the same kind of CPU",
            choices=tuple(LEVELS),
        ),
    )

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        level = options["level"]
        context.workdir.mkdir(parents=True, exist_ok=True)
        target = context.workdir / f"ortopt_{level}.onnx"
        # the device's options (level all warns that NCHWc is CPU-specific: QUIET hides it)
        optimizing = session_options(context.threads)
        optimizing.graph_optimization_level = LEVELS[level]
        optimizing.optimized_model_filepath = str(target)
        try:
            ort.InferenceSession(
                model.SerializeToString(), optimizing, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise SlimfleetError(
                f"ortopt: onnxruntime cannot load the model: {error_line(exc)}"
            ) from None
        optimized = onnx.load(str(target))
        target.unlink()
        change = describe_change(model, optimized)
        if not change:
            return PassResult(copy_model(model), False, f"changed nothing at level {level}")
        notes = f"level {level}: {change}"
        contrib = sorted(
            {
                f"{n.domain}.{n.op_type}"
                for n in optimized.graph.node
                if n.domain not in DEFAULT_DOMAINS
            }
        )
        if contrib:
            notes += f"; needs onnxruntime's own ops ({', '.join(contrib)})"
        return PassResult(optimized, True, notes)


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``ortopt`` pass."""
    passes.add(OrtOptimize())
