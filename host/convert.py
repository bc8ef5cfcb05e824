"""Front-ends: turning a model that is not ONNX into ONNX, checked by running both.

``compress`` calls :func:`convert` when its source is not an ``.onnx`` file: a Python
object (a PyTorch ``nn.Module``, a fitted scikit-learn estimator), ``module:attr`` (an
importable object, or a function/class called with no arguments to build one), or a
path a front-end plugin knows (a TorchScript ``.pt``, an exported program ``.pt2``, a
Paddle inference directory). Front-ends implement ``slimfleet_convert``; the first one
that recognises the source converts it and checks the result with :func:`check`, which
runs onnxruntime on the user's samples against the source framework's own outputs.

Example inputs come from ``--data`` before the ONNX signature exists, so they follow
one rule: in a ``.npz`` axis 0 is the batch axis and every row is one sample (a batch
of one); in a directory of ``.npz`` files each file is one sample as the model takes it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.runtime import open_session
from slimfleet.host.compress import outdir as outdirs
from slimfleet.host.compress.data import RANDOM_BYTES, RANDOM_SAMPLES
from slimfleet.host.compress.modelfile import PROTOBUF_LIMIT
from slimfleet.host.feeds import load_npz
from slimfleet.host.passes import Feed

log = logging.getLogger(__name__)

MAX_EXAMPLES = 32
"""Samples a conversion is checked on (and exported from); the rest only go to the search."""
ATOL = 1e-4
RTOL = 1e-3
"""An output converts faithfully when max |onnx - source| <= ATOL + RTOL * max |source|."""
IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

EXTRAS = {
    "torch": "torch",
    "onnxscript": "torch",
    "sklearn": "sklearn",
    "skl2onnx": "sklearn",
    "paddle": "paddle",
    "paddle2onnx": "paddle",
}
"""Import name -> the slimfleet extra that installs it."""


class MissingExtra(InputError):
    """A front-end's framework is not installed; the message names the extra to install."""


class ConversionError(SlimfleetError):
    """A front-end could not convert the model, or ONNX disagrees with the source."""


def missing_extra(what: str, module: str) -> MissingExtra:
    """The one-line error for ``what`` needing the import ``module``."""
    extra = EXTRAS.get(module.split(".")[0], module)
    return MissingExtra(f"{what} needs {module}: pip install 'slimfleet[{extra}]'")


FRONTEND_SUFFIXES = frozenset({".pt", ".pt2", ".pth", ".pdmodel"})
"""File suffixes that go to the front-ends; any other file is loaded as ONNX."""


def is_onnx(source: Any) -> bool:
    """True when ``compress`` loads ``source`` as an ONNX file rather than converting it.

    A path is ONNX unless it is a directory, has a front-end suffix
    (:data:`FRONTEND_SUFFIXES`), or is ``module:attr`` naming no existing file.
    """
    if not isinstance(source, str | Path):
        return False
    path = Path(source)
    if path.exists():
        return not path.is_dir() and path.suffix.lower() not in FRONTEND_SUFFIXES
    return not (isinstance(source, str) and IMPORT_SPEC.match(source)) and (
        path.suffix.lower() not in FRONTEND_SUFFIXES
    )


def describe(source: Any) -> str:
    """A short name for ``source`` in messages and the report."""
    if isinstance(source, str | Path):
        return str(source)
    return f"<{type(source).__module__}.{type(source).__qualname__}>"


def resolve(source: Any) -> Any:
    """``module:attr`` (not an existing path) becomes the object it names; else ``source``.

    A function or class found there is called with no arguments to build the model.
    """
    if not isinstance(source, str) or Path(source).exists() or not IMPORT_SPEC.match(source):
        return source
    module_name, attr = source.split(":", 1)
    try:  # what the user's code prints goes to stderr: stdout may be --json
        with contextlib.redirect_stdout(sys.stderr):
            obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in EXTRAS:
            raise missing_extra(source, exc.name) from None
        raise InputError(f"{source}: cannot import {module_name} ({exc})") from None
    except (Exception, SystemExit) as exc:  # the user's module failed (or exited) importing
        raise InputError(f"{source}: importing {module_name} failed ({one_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{source}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                obj = obj()
        except (Exception, SystemExit) as exc:
            raise InputError(f"{source}: calling {attr}() failed ({one_line(exc)})") from None
    return obj


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it)."""
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit]}"


def example_feeds(
    data: Path | str | None, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> list[Feed]:
    """Up to :data:`MAX_EXAMPLES` samples to convert from (see the module docstring).

    Without ``data``, ``input_shapes`` gives float32 inputs drawn at random.
    """
    if data is None:
        if not input_shapes:
            raise InputError(
                "converting a model that is not ONNX needs example inputs: "
                "--data samples.npz (keys = input names) or --input-shape NAME:DIMS"
            )
        per_sample = sum(4 * math.prod(shape) for shape in input_shapes.values())
        if per_sample * RANDOM_SAMPLES > RANDOM_BYTES:
            raise InputError(
                f"--input-shape: {RANDOM_SAMPLES} random float32 samples would take "
                f"{per_sample * RANDOM_SAMPLES / 2**30:.1f} GiB (at most "
                f"{RANDOM_BYTES >> 30} GiB): give smaller shapes or --data"
            )
        rng = np.random.default_rng(0)
        return [
            {
                name: rng.standard_normal(shape).astype(np.float32)
                for name, shape in input_shapes.items()
            }
            for _ in range(RANDOM_SAMPLES)
        ]
    path = Path(data)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))[:MAX_EXAMPLES]
        if not files:
            raise InputError(f"--data {path}: no .npz files in this directory")
        feeds = [load_npz(f) for f in files]
    elif path.is_file():
        arrays = load_npz(path)
        counts = {key: len(a) if a.ndim else 0 for key, a in arrays.items()}
        if not arrays or 0 in counts.values() or len(set(counts.values())) != 1:
            raise InputError(
                f"--data {path}: every key must stack the same number (>0) of samples on "
                f"axis 0, got {counts}"
            )
        n = min(next(iter(counts.values())), MAX_EXAMPLES)
        feeds = [{key: a[i : i + 1] for key, a in arrays.items()} for i in range(n)]
    else:
        raise InputError(f"--data {path}: no such file or directory")
    keys = set(feeds[0])
    for i, feed in enumerate(feeds):
        if set(feed) != keys:
            raise InputError(
                f"--data {path}: sample {i} has keys {sorted(feed)}, not {sorted(keys)}"
            )
    return feeds


def dynamic_axes(feeds: Sequence[Feed]) -> dict[str, list[int]]:
    """Per input, the axes to export as dynamic: the batch axis and any that varies."""
    axes: dict[str, list[int]] = {}
    for name, first in feeds[0].items():
        varying = {
            axis
            for feed in feeds[1:]
            for axis, (a, b) in enumerate(zip(first.shape, feed[name].shape, strict=False))
            if a != b
        }
        axes[name] = sorted(varying | ({0} if first.ndim else set()))
    return axes


def check(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    expected: Sequence[Sequence[np.ndarray]],
    source: str,
) -> None:
    """Run ``model`` on ``feeds`` and compare with the source's ``expected`` outputs.

    ``expected[i]`` lists sample ``i``'s outputs in the model's output order. Raises
    :class:`ConversionError` naming the worst output when any is off by more than
    ``ATOL + RTOL * max|expected|``.
    """
    try:
        session = open_session(model.SerializeToString())
    except Exception as exc:
        raise ConversionError(
            f"{source}: onnxruntime cannot load the converted model ({one_line(exc)})"
        ) from None
    names = [o.name for o in session.get_outputs()]
    worst: tuple[float, str, float, float] | None = None
    for i, (feed, want) in enumerate(zip(feeds, expected, strict=True)):
        try:
            got = session.run(None, feed)
        except Exception as exc:
            raise ConversionError(
                f"{source}: the converted model fails on sample {i} ({one_line(exc)})"
            ) from None
        if len(got) != len(want):
            raise ConversionError(
                f"{source}: the converted model has {len(got)} outputs, the source {len(want)}"
            )
        for name, g, w in zip(names, got, want, strict=True):
            w = np.asarray(w)
            if g.shape != w.shape:
                raise ConversionError(
                    f"{source}: output {name!r} sample {i} has shape {list(g.shape)} in ONNX "
                    f"but {list(w.shape)} in the source"
                )
            if g.size == 0:
                continue
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            err = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("inf")
            if np.isnan(g).any() != np.isnan(w).any():
                err = float("inf")
            scale = float(np.max(np.abs(w[np.isfinite(w)]))) if np.isfinite(w).any() else 0.0
            excess = err / (ATOL + RTOL * scale)
            if worst is None or excess > worst[0]:
                worst = (excess, name, err, err / scale if scale else err)
    if worst is not None and worst[0] > 1:
        _, name, err, rel = worst
        raise ConversionError(
            f"{source}: the ONNX conversion disagrees with the source on output {name!r}: "
            f"max abs error {err:.3g}, relative {rel:.3g} "
            f"(allowed {ATOL:g} + {RTOL:g} x max|output|)"
        )


@dataclass(frozen=True)
class Converted:
    """A converted model and where it came from."""

    model: onnx.ModelProto
    source: str


def convert(
    source: Any,
    hook: Any,
    *,
    data: Path | str | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    options: dict[str, Any] | None = None,
) -> Converted:
    """Convert ``source`` through ``slimfleet_convert`` (``hook`` is ``pm.hook``)."""
    name = describe(source)
    obj = resolve(source)
    feeds = example_feeds(data, input_shapes)
    model = hook.slimfleet_convert(source=obj, example_inputs=feeds, options=dict(options or {}))
    if model is None:
        raise InputError(
            f"{name}: not an ONNX file and no front-end reads it (built in: a PyTorch "
            "nn.Module, .pt TorchScript or .pt2 exported program, a Paddle inference "
            "directory, a scikit-learn estimator, or module:attr naming one)"
        )
    return Converted(model, name)


def convert_to_file(
    source: Any,
    hook: Any,
    outdir: Path,
    *,
    data: Path | str | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """Convert ``source`` and write it as ``outdir/converted.onnx``; return that path.

    Nothing is created when the conversion fails.
    """
    converted = convert(source, hook, data=data, input_shapes=input_shapes)
    size = converted.model.ByteSize()
    if size >= PROTOBUF_LIMIT:
        raise ConversionError(
            f"{converted.source}: the converted model is {size / 1e9:.1f} GB, over the 2 GB "
            "protobuf limit slimfleet works within"
        )
    path = outdirs.prepare(outdir) / outdirs.CONVERTED
    outdirs.write_atomic(path, converted.model.SerializeToString())
    log.info("converted %s to %s", converted.source, path)
    return path
