"""host/convert.py: example inputs, the ONNX check, module:attr, the hook, missing extras.

Framework-free: a front-end here is a test plugin implementing ``slimfleet_convert``
that returns an onnx.helper model, so these run whatever extras are installed.
"""

from __future__ import annotations

import sys
import textwrap

import models
import numpy as np
import pytest
from onnx import numpy_helper

from slimfleet.agent.errors import InputError
from slimfleet.host import convert
from slimfleet.host.compress import outdir
from slimfleet.host.compress.search import compress
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.plugins import load_plugins, make_plugin_manager

RNG = np.random.default_rng(3)


def mlp_outputs(model, feeds):
    """What the source framework would say: numpy running the MLP's own weights."""
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    outs = []
    for feed in feeds:
        h = np.maximum(feed["x"] @ w["w1"] + w["b1"], 0)
        outs.append([h @ w["w2"] + w["b2"]])
    return outs


class MlpSource:
    """A model object no built-in front-end knows."""


SOURCE = MlpSource()


class MlpFrontEnd:
    """Converts an :class:`MlpSource` to the helper MLP, optionally perturbed."""

    def __init__(self, perturb: float = 0.0):
        self.perturb = perturb
        self.calls = []

    @hookimpl
    def slimfleet_convert(self, source, example_inputs, options):
        if not isinstance(source, MlpSource):
            return None
        self.calls.append(len(example_inputs))
        model = models.mlp(features=8, hidden=16, classes=4)
        expected = mlp_outputs(model, example_inputs)
        if self.perturb:
            w2 = model.graph.initializer[2]
            array = numpy_helper.to_array(w2).copy()
            array[0, 0] += self.perturb
            w2.CopyFrom(numpy_helper.from_array(array, w2.name))
        convert.check(model, example_inputs, expected, "mlp")
        return model


def hook_with(frontend):
    pm = make_plugin_manager(entry_points=False)
    pm.register(frontend)
    return pm.hook


@pytest.fixture
def samples(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=RNG.standard_normal((6, 8)).astype(np.float32))
    return path


def test_a_front_end_converts_through_the_hook_with_one_feed_per_sample(samples):
    frontend = MlpFrontEnd()
    converted = convert.convert(SOURCE, hook_with(frontend), data=samples)
    assert frontend.calls == [6]
    assert [i.name for i in converted.model.graph.input] == ["x"]


def test_a_perturbed_conversion_names_the_worst_output_and_its_error(samples):
    with pytest.raises(convert.ConversionError) as err:
        convert.convert(SOURCE, hook_with(MlpFrontEnd(perturb=0.5)), data=samples)
    message = str(err.value)
    assert "output 'y'" in message and "max abs error" in message and "relative" in message
    assert "\n" not in message


def test_a_tiny_perturbation_within_tolerance_passes(samples):
    convert.convert(SOURCE, hook_with(MlpFrontEnd(perturb=1e-7)), data=samples)


def test_check_refuses_a_shape_and_a_count_mismatch():
    model = models.mlp(features=8, hidden=16, classes=4)
    feeds = [{"x": RNG.standard_normal((1, 8)).astype(np.float32)}]
    right = mlp_outputs(model, feeds)
    with pytest.raises(convert.ConversionError, match=r"shape \[1, 4\] in ONNX but \[4\]"):
        convert.check(model, feeds, [[right[0][0][0]]], "src")
    with pytest.raises(convert.ConversionError, match="1 outputs, the source 2"):
        convert.check(model, feeds, [[right[0][0], right[0][0]]], "src")
    nan = right[0][0].copy()
    nan[0, 0] = np.nan
    with pytest.raises(convert.ConversionError, match="output 'y'"):
        convert.check(model, feeds, [[nan]], "src")


def test_no_front_end_for_the_source_is_one_line(samples):
    with pytest.raises(InputError, match="no front-end reads it"):
        convert.convert(object(), hook_with(MlpFrontEnd()), data=samples)


def test_compress_runs_a_converted_source_end_to_end(tmp_path, samples):
    plugins = load_plugins(make_plugin_manager(entry_points=False))
    plugins.pm.register(MlpFrontEnd())
    out = tmp_path / "out"
    result = compress(SOURCE, out, data=samples, passes="simplify", plugins=plugins)
    assert (out / outdir.CONVERTED).is_file()
    assert (out / "model.onnx").is_file()
    assert result.data["candidates"][0]["status"] == "baseline"
    # an ONNX run into the same OUTDIR replaces that output: the old conversion is not its
    onnx_model = tmp_path / "m.onnx"
    onnx_model.write_bytes((out / outdir.CONVERTED).read_bytes())
    compress(onnx_model, out, data=samples, passes="simplify", plugins=plugins)
    assert not (out / outdir.CONVERTED).exists()
    assert (out / "model.onnx").is_file()


def test_a_failed_conversion_creates_no_output_directory(tmp_path, samples):
    plugins = load_plugins(make_plugin_manager(entry_points=False))
    plugins.pm.register(MlpFrontEnd(perturb=0.5))
    with pytest.raises(convert.ConversionError):
        compress(SOURCE, tmp_path / "out", data=samples, plugins=plugins)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("model.onnx", True),
        ("weird-name.bin", True),
        ("net.pt", False),
        ("net.pt2", False),
        ("pkg.mod:build", False),
        (object(), False),
    ],
)
def test_which_sources_are_loaded_as_onnx(source, expected):
    assert convert.is_onnx(source) is expected


def test_a_directory_is_not_onnx(tmp_path):
    assert not convert.is_onnx(tmp_path)


def test_example_inputs_from_a_stacked_npz_are_batches_of_one(samples):
    feeds = convert.example_feeds(samples)
    assert len(feeds) == 6 and feeds[0]["x"].shape == (1, 8)


def test_example_inputs_from_a_directory_keep_each_files_shape(tmp_path):
    for i, width in enumerate((20, 24, 20)):
        np.savez(tmp_path / f"{i}.npz", image=np.zeros((1, 3, 8, width), np.float32))
    feeds = convert.example_feeds(tmp_path)
    assert [f["image"].shape[3] for f in feeds] == [20, 24, 20]
    assert convert.dynamic_axes(feeds) == {"image": [0, 3]}


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, "same number"),
        ({"a": np.float32(1)}, "same number"),
    ],
)
def test_example_inputs_that_do_not_stack_are_refused(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=match):
        convert.example_feeds(path)


def test_example_inputs_are_needed(tmp_path):
    with pytest.raises(InputError, match="needs example inputs"):
        convert.example_feeds(None)
    with pytest.raises(InputError, match="no such file"):
        convert.example_feeds(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(InputError, match="not an .npz file"):
        convert.example_feeds(tmp_path / "junk.npz")
    with pytest.raises(InputError, match=r"16 random float32 samples would take .* GiB"):
        convert.example_feeds(None, {"x": (100_000, 100_000, 100)})  # was a MemoryError
    feeds = convert.example_feeds(None, {"x": (1, 8)})
    assert feeds[0]["x"].shape == (1, 8) and feeds[0]["x"].dtype == np.float32


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``usermod`` on sys.path; its body is written by the test."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(body: str, name: str = "usermod") -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        sys.modules.pop(name, None)
        return name

    yield write
    sys.modules.pop("usermod", None)


def test_module_attr_names_an_object_or_a_builder(user_module):
    user_module(
        """
        VALUE = {"kind": "instance"}
        def build():
            return {"kind": "built"}
        class Net:
            pass
        """
    )
    assert convert.resolve("usermod:VALUE") == {"kind": "instance"}
    assert convert.resolve("usermod:build") == {"kind": "built"}
    assert type(convert.resolve("usermod:Net")).__name__ == "Net"


@pytest.mark.parametrize(
    ("body", "spec", "match"),
    [
        ("X = 1\n", "nosuchmodule_xyz:X", "cannot import nosuchmodule_xyz"),
        ("X = 1\n", "usermod:Y", "has no attribute 'Y'"),
        ("raise RuntimeError('boom')\n", "usermod:X", "importing usermod failed"),
        ("def X():\n    raise ValueError('no')\n", "usermod:X", r"calling X\(\) failed"),
    ],
)
def test_module_attr_that_cannot_be_had_is_one_line(user_module, body, spec, match):
    user_module(body)
    with pytest.raises(InputError, match=match) as err:
        convert.resolve(spec)
    assert "\n" not in str(err.value)


def test_a_missing_framework_names_the_extra(user_module, monkeypatch):
    monkeypatch.setitem(convert.EXTRAS, "slimfleet_absent_framework", "torch")
    user_module("import slimfleet_absent_framework\n")
    with pytest.raises(convert.MissingExtra) as err:
        convert.resolve("usermod:Net")
    assert str(err.value) == (
        "usermod:Net needs slimfleet_absent_framework: pip install 'slimfleet[torch]'"
    )
    assert err.value.exit_code == 2


@pytest.mark.parametrize(("module", "extra"), [("torch", "torch"), ("skl2onnx", "sklearn")])
def test_each_front_end_names_its_extra_when_its_framework_is_absent(
    tmp_path, monkeypatch, module, extra
):
    """With the framework blocked from import, the front-end says which extra to install."""
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ModuleNotFoundError
    if module == "torch":
        source = tmp_path / "net.pt"
        source.write_bytes(b"not read")
    else:
        sklearn = pytest.importorskip("sklearn.linear_model", reason="needs scikit-learn")
        source = sklearn.LinearRegression()
    with pytest.raises(convert.MissingExtra, match=rf"pip install 'slimfleet\[{extra}\]'"):
        convert.convert(source, load_plugins().pm.hook, data=None, input_shapes={"x": (1, 2)})


def test_user_code_that_exits_or_prints_cannot_end_or_garble_the_command(user_module, capsys):
    # sys.exit(0) at import ended 'compress' with exit 0 and no output; prints went to the
    # stdout of 'compress --json'
    user_module("import sys\nprint('hello from import')\nsys.exit(0)\n", "exits_on_import")
    with pytest.raises(InputError, match=r"importing exits_on_import failed \(SystemExit"):
        convert.resolve("exits_on_import:net")
    user_module(
        "import sys\nprint('hello')\ndef build():\n    print('building')\n    sys.exit(3)\n",
        "exits_in_build",
    )
    with pytest.raises(InputError, match=r"calling build\(\) failed \(SystemExit: 3"):
        convert.resolve("exits_in_build:build")
    printed = capsys.readouterr()
    assert printed.out == "" and "building" in printed.err
