"""scikit-learn front-end: a fitted estimator or pipeline, converted by skl2onnx.

The estimator takes one input, so ``--data`` holds one key (its name becomes the ONNX
input's). Classifiers are converted without ZipMap, so their outputs are a label tensor
and a probability tensor, checked against ``predict`` and ``predict_proba``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from slimfleet.agent.errors import InputError
from slimfleet.host.convert import ConversionError, check, describe, missing_extra, one_line
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Feed

log = logging.getLogger(__name__)

OPSET = 17


def _is_estimator(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] == "sklearn" for c in type(obj).__mro__[:-1])


def _final(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return _final(steps[-1][1]) if steps else estimator


def _tensor_type(dtype: np.dtype, name: str, source: str) -> Any:
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, Int64TensorType

    types = {
        np.dtype(np.float32): FloatTensorType,
        np.dtype(np.float64): DoubleTensorType,
        np.dtype(np.int64): Int64TensorType,
    }
    if dtype not in types:
        raise InputError(
            f"{source}: example input {name!r} is {dtype}; use float32, float64 or int64"
        )
    return types[dtype]


def _expected(estimator: Any, x: np.ndarray, classifier: bool) -> list[np.ndarray]:
    if classifier:
        return [np.asarray(estimator.predict(x)), np.asarray(estimator.predict_proba(x))]
    if hasattr(estimator, "predict"):
        return [np.asarray(estimator.predict(x))]
    return [np.asarray(estimator.transform(x))]


def _like(want: np.ndarray, output: onnx.ValueInfoProto) -> np.ndarray:
    """``predict``'s ``(n,)`` becomes ``(n, 1)`` where the ONNX output has rank 2."""
    rank = len(output.type.tensor_type.shape.dim)
    return want.reshape(len(want), -1) if rank == 2 and want.ndim == 1 else want


@hookimpl
def slimfleet_convert(
    source: Any, example_inputs: Sequence[Feed], options: dict[str, Any]
) -> onnx.ModelProto | None:
    """Convert a fitted scikit-learn estimator with skl2onnx, checked on the examples."""
    if not _is_estimator(source):
        return None
    name = describe(source)
    try:
        import skl2onnx
        from sklearn.base import is_classifier
    except ModuleNotFoundError as exc:
        raise missing_extra(name, exc.name or "skl2onnx") from None
    keys = list(example_inputs[0])
    if len(keys) != 1:
        raise InputError(
            f"{name}: example inputs do not fit: an estimator takes one input, --data has keys {keys}"
        )
    key = keys[0]
    rows = [np.asarray(feed[key]) for feed in example_inputs]
    if any(r.ndim != 2 or r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise InputError(
            f"{name}: example inputs do not fit: {key!r} must be samples x features, got "
            f"{sorted({r.shape for r in rows})}"
        )
    tensor_type = _tensor_type(rows[0].dtype, key, name)
    final = _final(source)
    classifier = bool(is_classifier(final))
    try:
        expected_all = [_expected(source, r, classifier) for r in rows]
    except Exception as exc:
        raise InputError(f"{name}: example inputs do not fit: {one_line(exc)}") from None
    try:
        model = skl2onnx.to_onnx(
            source,
            initial_types=[(key, tensor_type([None, rows[0].shape[1]]))],
            target_opset=OPSET,
            options={id(final): {"zipmap": False}} if classifier else None,
        )
    except Exception as exc:
        raise ConversionError(f"{name}: skl2onnx cannot convert it ({one_line(exc)})") from None
    outputs = list(model.graph.output)
    expected = [[_like(w, o) for w, o in zip(want, outputs, strict=False)] for want in expected_all]
    check(model, [{key: r} for r in rows], expected, f"{name} (skl2onnx)")
    log.info("%s: converted by skl2onnx, checked on %d samples", name, len(rows))
    return model
