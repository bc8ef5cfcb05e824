"""The peers slimfleet is compared with, each run as a careful user runs it.

* onnxruntime's quantizer: ``quant_pre_process`` first (shape inference + graph
  optimisation, as its docs ask), then static QDQ per-channel (model upgraded to opset 13
  when older, which per-channel QDQ needs) calibrated on the calibration samples, and
  dynamic quantization.
* NNCF post-training quantization for ONNX (``nncf.quantize``) on the same calibration
  samples, and ``nncf.quantize_with_accuracy_control`` validated with the benchmark's own
  task metric against fp32 (at most 1 point lost), on the same samples.

They need the optional ``bench`` extra (``pip install '.[bench]'``); without nncf its rows
say so. Each peer runs in a child process under the benchmark's time and memory bounds,
so a peer that crashes or blows up is a row with its reason, not a dead benchmark.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from benchlib import Feed, outputs_of

MAX_DROP = 0.01
"""What quantize_with_accuracy_control may lose on the task metric (absolute)."""

Validate = Callable[[list[list[np.ndarray]]], float]
"""The task metric of a model's outputs on the calibration samples, against fp32's."""


@dataclass(frozen=True)
class Peer:
    name: str
    build: Callable[[Path, Sequence[Feed], Path, Path, Validate], None]
    """``build(model, calibration, workdir, target, validate)`` writes ``target``."""
    needs: str | None = None
    """Module that must be importable, or None."""

    def build_in(self, workdir: Path, model, calibration, target, validate) -> None:
        """``build`` with ``workdir`` as the current directory: onnxruntime's symbolic
        shape inference, when it gives up inside ``quant_pre_process``, saves
        ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` of all the weights into the
        current directory; there they go away with the workdir. Meant for a child process
        (the directory change is the process's)."""
        model, workdir, target = Path(model).resolve(), workdir.resolve(), target.resolve()
        os.chdir(workdir)
        self.build(model, calibration, workdir, target, validate)

    def missing(self) -> str | None:
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not installed (pip install '.[bench]')"
        return None


def _quiet(fn: Callable[[], None]) -> None:
    logging.disable(logging.WARNING)
    try:
        fn()
    finally:
        logging.disable(logging.NOTSET)


def _preprocessed(model: Path, workdir: Path) -> Path:
    """``quant_pre_process`` output, cached per workdir; opset raised to 13 when lower."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = workdir / "ort_preprocessed.onnx"
    if target.exists():
        return target
    source = model
    proto = onnx.load(str(model), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    if (opset is not None and opset < 13) or external:
        # quant_pre_process copies the model alone into a temporary directory, so weights
        # in an external data file are lost there: hand it one self-contained file
        full = onnx.load(str(model))
        upgraded = version_converter.convert_version(full, 13) if opset and opset < 13 else full
        source = workdir / "ort_source.onnx"
        onnx.save(upgraded, str(source))
    try:
        _quiet(lambda: quant_pre_process(str(source), str(target)))
    except Exception:  # what its docs advise when symbolic shape inference gives up
        _quiet(lambda: quant_pre_process(str(source), str(target), skip_symbolic_shape=True))
    return target


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def ort_static(model, calibration, workdir, target, validate) -> None:
    from onnxruntime.quantization import QuantFormat, quantize_static

    source = _preprocessed(model, workdir)
    _quiet(
        lambda: quantize_static(
            str(source),
            str(target),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
        )
    )


def ort_dynamic(model, calibration, workdir, target, validate) -> None:
    from onnxruntime.quantization import quantize_dynamic

    source = _preprocessed(model, workdir)
    _quiet(lambda: quantize_dynamic(str(source), str(target)))


def _save(proto, target: Path) -> None:
    import onnx

    large = proto.ByteSize() > 1_900_000_000
    onnx.save(proto, str(target), save_as_external_data=large, location=f"{target.name}.data")


def nncf_ptq(model, calibration, workdir, target, validate) -> None:
    import nncf
    import onnx

    quantized = nncf.quantize(onnx.load(str(model)), nncf.Dataset(list(calibration)))
    _save(quantized, target)


def nncf_accuracy_control(model, calibration, workdir, target, validate) -> None:
    import nncf
    import onnx

    def validation_fn(proto, samples) -> float:
        path = workdir / "nncf_aac_trial.onnx"
        _save(proto, path)
        return validate(outputs_of(path, list(samples)))

    dataset = nncf.Dataset(list(calibration))
    quantized = nncf.quantize_with_accuracy_control(
        onnx.load(str(model)),
        calibration_dataset=dataset,
        validation_dataset=dataset,
        validation_fn=validation_fn,
        max_drop=MAX_DROP,
        drop_type=nncf.DropType.ABSOLUTE,
    )
    _save(quantized, target)


PEERS = (
    Peer("ORT static QDQ/ch", ort_static),
    Peer("ORT dynamic", ort_dynamic),
    Peer("NNCF PTQ", nncf_ptq, needs="nncf"),
    Peer("NNCF accuracy ctrl", nncf_accuracy_control, needs="nncf"),
)
