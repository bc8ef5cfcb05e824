"""The Paddle front-end: paddle2onnx in a subprocess, its errors, and (with Paddle) a model.

The happy path needs an interpreter with paddlepaddle, paddle2onnx and packaging: this
one, or the one ``SLIMFLEET_PADDLE_PYTHON`` names (a separate venv, since paddle2onnx
pins onnx<=1.17). The error paths run everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host import convert
from slimfleet.host.plugins import load_plugins
from slimfleet.plugins.frontends import paddlepaddle

HOOK = load_plugins().pm.hook
RNG = np.random.default_rng(4)


def paddle_python() -> str | None:
    """An interpreter that imports paddle and paddle2onnx, or None."""
    for python in (os.environ.get(paddlepaddle.PYTHON_ENV), sys.executable):
        if not python:
            continue
        probe = subprocess.run(
            [python, "-c", "import paddle, paddle2onnx, packaging"], capture_output=True, cwd="/"
        )
        if probe.returncode == 0:
            return python
    return None


@pytest.fixture
def data(tmp_path):
    np.savez(tmp_path / "x.npz", image=RNG.random((3, 3, 16, 16), dtype=np.float32))
    return tmp_path / "x.npz"


def fake_model_dir(tmp_path):
    folder = tmp_path / "inference"
    folder.mkdir()
    (folder / "model.json").write_text("{}")
    (folder / "model.pdiparams").write_bytes(b"")
    return folder


def test_a_directory_without_a_model_is_one_line(tmp_path, data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.json").write_text("{}")  # no .pdiparams beside it
    with pytest.raises(InputError, match="no Paddle inference model here"):
        convert.convert(tmp_path / "empty", HOOK, data=data)


def test_a_python_without_paddle_names_the_extra(tmp_path, data, monkeypatch):
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # no site-packages
    bare.chmod(0o755)
    monkeypatch.setenv(paddlepaddle.PYTHON_ENV, str(bare))
    with pytest.raises(convert.MissingExtra) as err:
        convert.convert(fake_model_dir(tmp_path), HOOK, data=data)
    assert "pip install 'slimfleet[paddle]'" in str(err.value)
    assert paddlepaddle.PYTHON_ENV in str(err.value)


def test_an_interpreter_that_does_not_exist_is_one_line(tmp_path, data, monkeypatch):
    monkeypatch.setenv(paddlepaddle.PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(InputError, match="no such interpreter"):
        convert.convert(fake_model_dir(tmp_path), HOOK, data=data)


def test_a_worker_that_dies_is_a_conversion_error_with_its_last_line(tmp_path, data, monkeypatch):
    dying = tmp_path / "dying-python"
    dying.write_text("#!/bin/sh\necho 'Segmentation fault in libpaddle' >&2\nexit 139\n")
    dying.chmod(0o755)
    monkeypatch.setenv(paddlepaddle.PYTHON_ENV, str(dying))
    with pytest.raises(convert.ConversionError, match=r"worker died \(exit 139: Segmentation"):
        convert.convert(fake_model_dir(tmp_path), HOOK, data=data)


PADDLE_NET = textwrap.dedent(
    """
    import sys
    import paddle

    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.head = paddle.nn.Linear(8, 4)

        def forward(self, image):
            return self.head(paddle.nn.functional.relu(self.conv(image)).mean(axis=[2, 3]))

    net = Net()
    net.eval()
    spec = [paddle.static.InputSpec([None, 3, 16, 16], "float32", "image")]
    paddle.jit.save(net, sys.argv[1] + "/model", input_spec=spec)
    """
)


@pytest.fixture(scope="module")
def paddle_model(tmp_path_factory):
    python = paddle_python()
    if python is None:
        pytest.skip(
            "needs paddlepaddle + paddle2onnx: pip install 'slimfleet[paddle]' or set "
            f"{paddlepaddle.PYTHON_ENV} to a venv that has them"
        )
    folder = tmp_path_factory.mktemp("paddle")
    script = folder / "net.py"
    script.write_text(PADDLE_NET)
    subprocess.run([python, str(script), str(folder)], check=True, capture_output=True, cwd="/")
    return python, folder


def test_a_paddle_model_converts_and_matches(paddle_model, data, monkeypatch):
    python, folder = paddle_model
    monkeypatch.setenv(paddlepaddle.PYTHON_ENV, python)
    model = convert.convert(folder, HOOK, data=data).model
    assert [i.name for i in model.graph.input] == ["image"]


def test_paddle_inputs_that_do_not_fit_are_one_line(paddle_model, tmp_path, monkeypatch):
    python, folder = paddle_model
    monkeypatch.setenv(paddlepaddle.PYTHON_ENV, python)
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match=r"example inputs do not fit: the model takes \['image'\]"):
        convert.convert(folder, HOOK, data=tmp_path / "bad.npz")
