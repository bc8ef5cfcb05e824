"""Pass ``simplify``: onnxsim's constant folding and fusions (BatchNorm into Conv), checked.

When onnxsim crashes or its own check finds different outputs, the pass keeps the
model as it came in and says why: a failed simplification never fails a candidate.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import onnx
import onnxsim

from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Option, Pass, PassContext, PassResult
from slimfleet.host.registry import Registry
from slimfleet.plugins.onnxgraph import copy_model, describe_change, error_line, op_counts


class Simplify(Pass):
    name = "simplify"
    description = (
        "Fold constants and fuse ops (BatchNorm into Conv) with onnxsim, checked by running "
        "both models; keeps the input when onnxsim fails (lossless)"
    )
    lossless = True
    options = (
        Option(
            "check_runs",
            int,
            3,
            "runs comparing outputs of both models on random inputs (one run on the first "
            "calibration sample instead when there is one; 0 skips the check)",
        ),
    )

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        runs = options["check_runs"]
        kwargs: dict[str, Any] = {"check_n": runs, "certify": False}
        if runs and context.calibration:
            kwargs.update(check_n=1, input_data=dict(context.calibration[0]))
        chatter = io.StringIO()  # onnxsim prints progress; keep it for the debug log
        try:
            with contextlib.redirect_stdout(chatter):
                simplified, check_ok = onnxsim.simplify(copy_model(model), **kwargs)
        except Exception as exc:  # onnxsim raises whatever its C++ core or checker hit
            return _kept(model, f"onnxsim failed ({error_line(exc)})")
        finally:
            context.log.debug("onnxsim: %s", chatter.getvalue().strip())
        if not check_ok:
            return _kept(model, "onnxsim's check found different outputs")
        changed, notes = _compare(model, simplified)
        if not changed:
            return PassResult(copy_model(model), False, notes)
        _drop_onnxsim_metadata(simplified, model)
        return PassResult(simplified, True, notes)


def _kept(model: onnx.ModelProto, why: str) -> PassResult:
    return PassResult(copy_model(model), False, f"changed nothing: {why}; kept the input model")


def _drop_onnxsim_metadata(simplified: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """onnxsim records its settings in metadata_props; keep only what the input had."""
    own = {p.key for p in original.metadata_props}
    kept = [p for p in simplified.metadata_props if p.key in own or not p.key.startswith("onnxsim")]
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(kept)


def _compare(before: onnx.ModelProto, after: onnx.ModelProto) -> tuple[bool, str]:
    change = describe_change(before, after)
    if not change:
        return False, "changed nothing: onnxsim found nothing to fold or fuse"
    if op_counts(after)["BatchNormalization"] < op_counts(before)["BatchNormalization"]:
        change += "; BatchNorm folded into Conv"
    return True, change


@hookimpl
def slimfleet_add_passes(passes: Registry[Pass]) -> None:
    """Register the built-in ``simplify`` pass."""
    passes.add(Simplify())
