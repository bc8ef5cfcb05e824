"""Paddle front-end: an inference model directory, run and converted by paddle2onnx in a
subprocess (``paddle_worker.py``).

paddle2onnx 2.x pins ``onnx<=1.17``, imports ``packaging`` without declaring it and,
by default, pip-installs packages while folding constants. So it runs in its own
process, in the interpreter named by ``SLIMFLEET_PADDLE_PYTHON`` (a virtualenv holding
``paddlepaddle paddle2onnx packaging``, kept apart from slimfleet's onnx) or, without
it, this one; with ``PIP_NO_INDEX=1`` and polygraphy's auto-install off, so nothing
is installed behind the user's back. The directory holds ``NAME.json`` (Paddle 3) or
``NAME.pdmodel`` (Paddle 2) beside ``NAME.pdiparams``, as ``paddle.jit.save`` writes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimfleet.agent.errors import InputError
from slimfleet.host.convert import ConversionError, MissingExtra, check, describe
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Feed

log = logging.getLogger(__name__)

PYTHON_ENV = "SLIMFLEET_PADDLE_PYTHON"
"""An interpreter with paddlepaddle, paddle2onnx and packaging; default: this one."""
TIMEOUT = 600
"""Seconds the worker may take to run the samples and convert before it is killed."""
OPSET = 17
WORKER = Path(__file__).with_name("paddle_worker.py")
MODEL_SUFFIXES = (".json", ".pdmodel")


def find_model(directory: Path) -> tuple[Path, Path]:
    """``(model file, params file)`` in ``directory``; InputError when there is none."""
    for suffix in MODEL_SUFFIXES:
        for model in sorted(directory.glob(f"*{suffix}")):
            params = model.with_suffix(".pdiparams")
            if params.is_file():
                return model, params
    raise InputError(
        f"{directory}: no Paddle inference model here (expected NAME.json or NAME.pdmodel "
        "beside NAME.pdiparams, as paddle.jit.save writes)"
    )


def _python(options: dict[str, Any]) -> str:
    return str(options.get("paddle_python") or os.environ.get(PYTHON_ENV) or sys.executable)


def run_worker(python: str, model: Path, params: Path, feeds: Sequence[Feed], work: Path) -> dict:
    """Run the worker; return its JSON reply (raises the matching error on failure)."""
    samples = work / "samples"
    samples.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(samples / f"{i}.npz", **feed)
    env = {**os.environ, "PIP_NO_INDEX": "1", "POLYGRAPHY_AUTOINSTALL_DEPS": "0"}
    command = [python, str(WORKER), str(model), str(params), str(samples), str(work), str(OPSET)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except FileNotFoundError:
        raise InputError(f"{PYTHON_ENV}={python}: no such interpreter") from None
    except subprocess.TimeoutExpired:
        raise ConversionError(f"{model}: paddle2onnx took over {TIMEOUT} s; stopped") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    try:
        reply = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise ConversionError(
            f"{model}: the Paddle worker died (exit {proc.returncode}: {tail})"
        ) from None
    if reply.get("ok"):
        return reply
    if reply.get("kind") == "missing":
        raise MissingExtra(
            f"{model.parent} (Paddle) needs {reply['module']} in {python}: "
            f"pip install 'slimfleet[paddle]', or set {PYTHON_ENV} to a Python that has "
            "paddlepaddle, paddle2onnx and packaging"
        )
    error_type = InputError if reply.get("kind") == "input" else ConversionError
    raise error_type(f"{model}: {reply.get('error')}")


@hookimpl
def slimfleet_convert(
    source: Any, example_inputs: Sequence[Feed], options: dict[str, Any]
) -> onnx.ModelProto | None:
    """Convert a Paddle inference model directory with paddle2onnx, in a subprocess."""
    if not isinstance(source, str | Path):
        return None
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".pdmodel":
        path = path.parent
    if not path.is_dir():
        return None
    model_file, params_file = find_model(path)
    with tempfile.TemporaryDirectory(prefix="slimfleet-paddle-") as tmp:
        work = Path(tmp)
        reply = run_worker(_python(options), model_file, params_file, example_inputs, work)
        model = onnx.load(str(work / "model.onnx"))
        expected = []
        for i in range(len(example_inputs)):
            with np.load(work / f"expected-{i}.npz") as npz:
                expected.append([npz[f"o{j}"] for j in range(len(npz.files))])
    feeds = [{name: feed[name] for name in reply["inputs"]} for feed in example_inputs]
    check(model, feeds, expected, f"{describe(source)} (paddle2onnx)")
    log.info("%s: converted by paddle2onnx, checked on %d samples", path, len(feeds))
    return model
