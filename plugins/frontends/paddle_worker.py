"""Runs in the Paddle interpreter (a subprocess): run the model on the samples, convert it.

Standalone on purpose (imports only the standard library, numpy, paddle and
paddle2onnx), so it runs in an environment without slimfleet, e.g. one kept apart
because paddle2onnx pins ``onnx<=1.17``. Usage::

    python paddle_worker.py MODEL_FILE PARAMS_FILE SAMPLES_DIR OUT_DIR OPSET

``SAMPLES_DIR`` holds ``0.npz``, ``1.npz``... (input name -> array). It writes
``OUT_DIR/expected-I.npz`` (``o0``, ``o1``... in fetch order) and ``OUT_DIR/model.onnx``,
and prints one JSON line: ``{"ok": true, "inputs": [...]}``, or ``{"error": ...,
"kind": "missing" | "input" | "convert", "module": ...}``. Exit 0 ok, 2 bad input,
3 missing module, 1 conversion failed.

paddle2onnx's default ``optimize_tool="polygraphy"`` sets ``POLYGRAPHY_AUTOINSTALL_DEPS=1``
and lets polygraphy pip-install packages while converting; it is turned off here
(``optimize_tool="None"``): slimfleet's own ``simplify`` pass folds constants later.
"""

from __future__ import annotations

import json
import os
import sys

EXIT_CONVERT, EXIT_INPUT, EXIT_MISSING = 1, 2, 3


def _reply(code: int, **fields) -> None:
    print(json.dumps(fields), flush=True)
    sys.exit(code)


def _line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:300]}"


def main(model_file: str, params_file: str, samples: str, out: str, opset: str) -> None:
    for module in ("numpy", "packaging", "paddle", "paddle2onnx"):
        try:
            __import__(module)
        except ImportError as exc:
            _reply(EXIT_MISSING, kind="missing", module=module, error=_line(exc))
    import numpy as np
    import paddle
    import paddle2onnx

    paddle.enable_static()
    executor = paddle.static.Executor(paddle.CPUPlace())
    prefix = os.path.splitext(model_file)[0]
    try:
        program, feed_names, fetch = paddle.static.load_inference_model(prefix, executor)
    except Exception as exc:
        _reply(EXIT_INPUT, kind="input", error=f"cannot load the inference model ({_line(exc)})")
    files = sorted(os.listdir(samples), key=lambda f: int(f.split(".")[0]))
    for i, name in enumerate(files):
        with np.load(os.path.join(samples, name), allow_pickle=False) as npz:
            feed = {key: npz[key] for key in npz.files}
        if set(feed) != set(feed_names):
            _reply(
                EXIT_INPUT,
                kind="input",
                error=f"example inputs do not fit: the model takes {feed_names}, --data has keys {sorted(feed)}",
            )
        try:
            outputs = executor.run(program, feed=feed, fetch_list=fetch)
        except Exception as exc:
            _reply(
                EXIT_INPUT,
                kind="input",
                error=f"example inputs do not fit: sample {i} ({_line(exc)})",
            )
        np.savez(
            os.path.join(out, f"expected-{i}.npz"),
            **{f"o{j}": np.asarray(o) for j, o in enumerate(outputs)},
        )
    os.environ["POLYGRAPHY_AUTOINSTALL_DEPS"] = "0"
    try:
        paddle2onnx.export(
            model_file,
            params_file,
            save_file=os.path.join(out, "model.onnx"),
            opset_version=int(opset),
            enable_onnx_checker=True,
            optimize_tool="None",
        )
    except Exception as exc:
        _reply(EXIT_CONVERT, kind="convert", error=f"paddle2onnx failed ({_line(exc)})")
    _reply(0, ok=True, inputs=list(feed_names))


if __name__ == "__main__":
    sys.path.pop(0)  # this script's folder holds slimfleet's front-end modules, not paddle
    main(*sys.argv[1:6])
