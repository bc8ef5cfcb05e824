"""What gets published: the model bytes, its io signature and opset, a report summary and
a smoke test computed here with onnxruntime.

A source is either a ``slimfleet compress`` OUTDIR (``model.onnx``, ``report.json`` with a
top-level ``summary``, ``sample.npz`` with one input per input name) or a bare ``.onnx``
file, whose smoke input is drawn at random from its io signature (dynamic dims -> 1).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.agent.errors import InputError
from slimfleet.agent.runtime import open_session
from slimfleet.agent.wire import SmokeTest, loads_json
from slimfleet.host.compress.modelfile import io_signature, load_model, opset

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
SAMPLE_FILE = "sample.npz"

# The smoke test must pass on another CPU (other SIMD kernels, fp16/int8 arithmetic), yet
# catch a model that is broken or not the one published: outputs must agree within 2% of
# the largest expected magnitude, plus 1% relative.
SMOKE_ATOL_FRACTION = 0.02
SMOKE_MIN_ATOL = 1e-4
SMOKE_RTOL = 0.01


@dataclass
class Artifact:
    """A model ready to be put in a manifest."""

    source: Path
    data: bytes
    io: dict[str, Any]
    opset: int
    report: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, np.ndarray] | None = None  # None: draw one at random


def load_artifact(source: str | Path) -> Artifact:
    """Read an OUTDIR or an .onnx file; every problem is an InputError naming the file."""
    source = Path(source)
    if source.is_dir():
        model_path = source / MODEL_FILE
        if not model_path.is_file():
            raise InputError(f"{source}: no {MODEL_FILE} in this directory")
        report_path, sample_path = source / REPORT_FILE, source / SAMPLE_FILE
        report = _read_summary(report_path) if report_path.exists() else {}
        sample = _read_sample(sample_path) if sample_path.exists() else None
    elif source.is_file():
        model_path, report, sample = source, {}, None
    elif source.exists():  # a device, a pipe: /dev/null
        raise InputError(f"{source}: not a regular file or a compress output directory")
    else:
        raise InputError(f"{source}: no such file or directory")
    model = load_model(model_path)
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise InputError(f"{model_path}: cannot read: {exc.strerror or exc}") from None
    artifact = Artifact(source, data, io_signature(model), opset(model), report, sample)
    if sample is not None:
        expected = {i["name"] for i in artifact.io["inputs"]}
        if set(sample) != expected:
            raise InputError(
                f"{source / SAMPLE_FILE}: has arrays {sorted(sample)}, "
                f"the model's inputs are {sorted(expected)}"
            )
    return artifact


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        doc = loads_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the report: {exc}") from None
    summary = doc.get("summary") if isinstance(doc, dict) else None
    if not isinstance(summary, dict):
        raise InputError(f"{path}: has no top-level 'summary' object")
    return summary


def _read_sample(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz of arrays: {exc}") from None


# -- smoke test -----------------------------------------------------------------------


def random_inputs(io: dict[str, Any], seed: int | None = None) -> dict[str, np.ndarray]:
    """One input per model input: floats uniform in [0, 1), integers 0, booleans False;
    dynamic dims are 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in io["inputs"]:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec["shape"])
        try:
            dtype = np.dtype(spec["dtype"])
        except TypeError:
            raise InputError(f"input {spec['name']!r} has type {spec['dtype']}") from None
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.random(shape).astype(dtype)
        elif dtype.kind in "iub":
            feeds[spec["name"]] = np.zeros(shape, dtype)
        else:
            raise InputError(
                f"cannot draw a random {spec['dtype']} input for {spec['name']!r}: "
                f"publish a directory with {SAMPLE_FILE} instead"
            )
    return feeds


def make_smoke(artifact: Artifact, max_latency_ms: float | None = None) -> SmokeTest:
    """Run the model here on its sample (or a random one) and record the outputs."""
    inputs = artifact.sample if artifact.sample is not None else random_inputs(artifact.io)
    try:
        session = open_session(artifact.data)
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(names, inputs), strict=True))
    except Exception as exc:  # onnxruntime raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{artifact.source}: the model does not run on its smoke input: {first}"
        ) from None
    scale = 0.0
    for name, value in outputs.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc":
            if not np.all(np.isfinite(value)):
                raise InputError(
                    f"{artifact.source}: output {name!r} has NaN or inf on the smoke input"
                )
            if value.size:
                scale = max(scale, float(np.max(np.abs(value))))
    return SmokeTest(
        inputs=inputs,
        outputs={k: np.asarray(v) for k, v in outputs.items()},
        atol=max(SMOKE_MIN_ATOL, SMOKE_ATOL_FRACTION * scale),
        rtol=SMOKE_RTOL,
        max_latency_ms=max_latency_ms,
    )
