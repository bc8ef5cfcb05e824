"""The contract for samples: what a feed must look like for a model's inputs.

Data plugins (``slimfleet_load_data``) and the search both use :func:`conform_feed`, so
every sample that reaches a model is checked the same way, with one message format.

A declared dimension is fixed only when it is a positive integer: ``-1`` and ``0``
(Paddle's and some converters' way of writing "dynamic"), a symbol (``batch``) or a
missing dimension all accept any size.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.agent.errors import InputError
from slimfleet.host.passes import Feed

InputSpec = Mapping[str, Any]
"""One model input: ``{"name", "dtype", "shape"}`` as in ``modelfile.io_signature``."""


def fixed(dim: Any) -> bool:
    """True for a dimension that only accepts its own size (a positive int)."""
    return isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def show_shape(shape: Sequence[Any] | None) -> str:
    """``[1, 3, "width"]`` -> ``"1x3xwidth"`` (dynamic dims without a name show as ``?``)."""
    if shape is None:
        return "?"
    return "x".join(str(d) if d not in (None, "") and d != -1 else "?" for d in shape) or "scalar"


def fits(shape: Sequence[int], expected: Sequence[Any] | None) -> bool:
    """True when ``shape`` has the declared rank and every fixed dim's size."""
    if expected is None:
        return True
    return len(shape) == len(expected) and all(
        not fixed(e) or e == s for s, e in zip(shape, expected, strict=True)
    )


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file at ``path``, by key; InputError with one line when
    it is missing, not a zip (which ``np.load`` would try to unpickle, and say so), or
    holds object arrays (pickled Python objects, never loaded)."""
    try:
        if path.exists() and not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not an .npz file (numpy.savez writes one: a zip of arrays)")
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError(
                f"{path}: holds object arrays (pickled Python objects), which slimfleet never "
                "loads: save numeric arrays"
            ) from None
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None


def check_keys(keys: Iterable[str], inputs: Sequence[InputSpec], where: str) -> None:
    """Raise InputError unless ``keys`` are exactly the model's input names."""
    keys = set(keys)
    names = [spec["name"] for spec in inputs]
    missing = [n for n in names if n not in keys]
    extra = sorted(keys - set(names))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            problems.append(f"unexpected {', '.join(map(repr, extra))}")
        raise InputError(
            f"{where}: keys do not match the model inputs {names} ({'; '.join(problems)})"
        )


def _converted(array: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """``array`` as ``dtype`` when that keeps its values (or is float64 -> float32)."""
    if array.dtype == dtype:
        return array
    src, dst = array.dtype.kind, dtype.kind
    if dst == "f" and src in "fiub":
        return array.astype(dtype)
    if dst in "iub" and src in "iub":
        if array.size and dst in "iu":  # -1 as uint32 round-trips through 4294967295
            limits = np.iinfo(dtype)
            if array.min() < limits.min or array.max() > limits.max:
                return None
        converted = array.astype(dtype)
        if np.array_equal(converted.astype(array.dtype), array):
            return converted
    return None


def conform_feed(feed: Mapping[str, Any], inputs: Sequence[InputSpec], where: str) -> Feed:
    """``feed`` made to fit ``inputs``, or an InputError saying what and where.

    Accepted besides exact matches: Python and numpy scalars for any input; a 1-element
    array for a 0-d input (a sample rate); integers stored wider or narrower than
    declared when every value survives the conversion (int64 token ids for an int32
    input, 0/1 for bool); integers and float64 for a float input.
    """
    check_keys(feed, inputs, where)
    conformed = {}
    for spec in inputs:
        value = feed[spec["name"]]
        array = np.asarray(value) if not isinstance(value, np.ndarray) else value
        if array.dtype.kind not in "biuf":
            raise InputError(f"{where}: input {spec['name']!r} is not a numeric array")
        expected = spec["shape"]
        if expected is not None and len(expected) == 0 and array.shape == (1,):
            array = array.reshape(())
        try:
            dtype = np.dtype(spec["dtype"])
        except TypeError:
            raise InputError(
                f"{where}: input {spec['name']!r} is {spec['dtype']}, which slimfleet cannot feed"
            ) from None
        converted = _converted(array, dtype)
        if converted is None or not fits(array.shape, expected):
            lost = converted is None and array.dtype.kind in "iub" and dtype.kind in "iub"
            raise InputError(
                f"{where}: input {spec['name']!r} expects {spec['dtype']} "
                f"{show_shape(expected)}, got {array.dtype.name} {show_shape(array.shape)}"
                + (
                    f" (values {array.min()} to {array.max()} do not fit {dtype.name})"
                    if lost
                    else ""
                )
            )
        conformed[spec["name"]] = converted
    return conformed
