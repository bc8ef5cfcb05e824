"""The PyTorch front-end on real torch: modules, TorchScript, exported programs, module:attr.

Skipped without the ``torch`` extra. Export coverage uses hand-built networks (conv +
batch-norm + residual, a two-input/two-output module, a sequence model with a varying
length): torchvision cannot be installed beside the CPU torch here.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch", reason="needs the torch extra: pip install 'slimfleet[torch]'")
pytest.importorskip("onnxscript", reason="needs the torch extra (onnxscript, dynamo exporter)")

from slimfleet.agent.errors import InputError  # noqa: E402
from slimfleet.host import convert  # noqa: E402
from slimfleet.host.cli import cli  # noqa: E402
from slimfleet.host.plugins import load_plugins  # noqa: E402

RNG = np.random.default_rng(11)
HOOK = load_plugins().pm.hook


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, image):
        h = torch.relu(self.bn(self.conv(image)))
        h = h + torch.relu(self.conv2(h))
        return self.head(h.mean((2, 3)))


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(3, 4)

    def forward(self, left, right):
        h = torch.tanh(self.a(left) + self.b(right))
        return {"scores": h.softmax(-1), "raw": h}


class SequenceNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = torch.nn.GRU(4, 8, batch_first=True)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, tokens):
        h, _ = self.gru(tokens)
        return self.out(h)


class SignBranch(torch.nn.Module):
    """Data-dependent Python control flow: dynamo refuses it, the legacy tracer bakes
    in whichever branch the example took, so the ONNX is wrong on other samples."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 100


def stacked(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_a_module_exports_with_a_dynamic_batch_and_matches(tmp_path):
    data = stacked(tmp_path / "x.npz", image=RNG.random((4, 3, 16, 16), dtype=np.float32))
    model = convert.convert(ConvNet().eval(), HOOK, data=data).model
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert (
        image.name == "image"
        and dims[0].dim_param
        and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    )


def test_two_inputs_and_a_dict_of_outputs(tmp_path):
    data = stacked(
        tmp_path / "x.npz",
        right=RNG.random((3, 3), dtype=np.float32),
        left=RNG.random((3, 6), dtype=np.float32),
    )
    model = convert.convert(TwoHeads(), HOOK, data=data).model
    assert [i.name for i in model.graph.input] == ["left", "right"]
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]


def test_an_axis_that_varies_across_samples_is_exported_dynamic(tmp_path):
    for i, length in enumerate((5, 9, 7)):
        np.savez(tmp_path / f"{i}.npz", tokens=RNG.random((1, length, 4), dtype=np.float32))
    model = convert.convert(SequenceNet(), HOOK, data=tmp_path).model
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_param and dims[2].dim_value == 4


def test_torchscript_and_exported_program_files(tmp_path):
    net = ConvNet().eval()
    x = RNG.random((3, 3, 16, 16), dtype=np.float32)
    data = stacked(tmp_path / "x.npz", image=x)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.pt"))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(net, (torch.from_numpy(x),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "net.pt2"))
    for name in ("net.pt", "net.pt2"):
        model = convert.convert(str(tmp_path / name), HOOK, data=data).model
        assert len(model.graph.input) == 1, name


def test_a_conversion_that_disagrees_with_the_module_is_an_error_naming_the_output(tmp_path):
    x = np.concatenate([np.ones((2, 4)), -np.ones((2, 4))]).astype(np.float32)
    data = stacked(tmp_path / "x.npz", x=x)
    with pytest.raises(convert.ConversionError) as err:
        convert.convert(SignBranch(), HOOK, data=data)
    message = str(err.value)
    assert "dynamo exporter failed" in message
    assert "legacy exporter" in message and "output 'output'" in message
    assert "max abs error" in message and "\n" not in message


def test_example_inputs_that_do_not_fit_are_one_line(tmp_path):
    wrong_channels = stacked(tmp_path / "c.npz", image=RNG.random((2, 4, 16, 16), dtype=np.float32))
    with pytest.raises(InputError, match="example inputs do not fit: forward failed on sample 0"):
        convert.convert(ConvNet(), HOOK, data=wrong_channels)
    wrong_names = stacked(
        tmp_path / "n.npz", a=np.zeros((2, 6), np.float32), b=np.zeros((2, 3), np.float32)
    )
    with pytest.raises(InputError, match=r"forward takes \(left, right\)"):
        convert.convert(TwoHeads(), HOOK, data=wrong_names)


def test_a_file_that_is_not_torchscript_is_one_line(tmp_path):
    torch.save(ConvNet().state_dict(), str(tmp_path / "weights.pth"))
    data = stacked(tmp_path / "x.npz", image=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match="not TorchScript .*a state_dict needs its nn.Module"):
        convert.convert(str(tmp_path / "weights.pth"), HOOK, data=data)


def test_cli_compresses_module_attr_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "usernet.py").write_text(
        textwrap.dedent(
            """
            import torch

            def build():
                torch.manual_seed(0)
                return torch.nn.Sequential(
                    torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
                )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = stacked(tmp_path / "x.npz", input=RNG.random((8, 16), dtype=np.float32))
    out = tmp_path / "out"
    args = [
        "compress",
        "usernet:build",
        "--data",
        str(data),
        "-o",
        str(out),
        "--passes",
        "simplify",
        "--quick",
        "--json",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["choice"]["candidate"] in (0, 1)
    converted = onnx.load(str(out / "converted.onnx"))
    assert [i.name for i in converted.graph.input] == ["input"]


class BatchOfOne(torch.nn.Module):
    """Takes exactly one sample (a hard-coded view), so it cannot be exported from two."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.lin(x.view(1, 8))


def test_a_module_that_takes_only_a_batch_of_one_still_converts(tmp_path):
    data = stacked(tmp_path / "x.npz", x=RNG.random((3, 8), dtype=np.float32))
    model = convert.convert(BatchOfOne(), HOOK, data=data).model
    assert [o.name for o in model.graph.output] == ["output"]
