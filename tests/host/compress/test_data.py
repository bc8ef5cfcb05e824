from __future__ import annotations

import logging

import numpy as np
import pluggy
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host import hookspecs
from slimfleet.host.compress import data
from slimfleet.host.hookspecs import hookimpl
from slimfleet.plugins import npzdata

INPUTS = [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]


def _hook(*plugins: object):
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(npzdata)
    for plugin in plugins:
        pm.register(plugin)
    return pm.hook


def _stacked(tmp_path, count: int):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(count * 4, dtype=np.float32).reshape(count, 4))
    return path


def test_split_is_disjoint_deterministic_and_covers_everything(tmp_path):
    samples = data.load_samples(_hook(), _stacked(tmp_path, 10), INPUTS)
    again = data.load_samples(_hook(), _stacked(tmp_path, 10), INPUTS)
    first = lambda feeds: sorted(int(f["x"][0, 0]) for f in feeds)  # noqa: E731
    assert len(samples.evaluation) == 5 and len(samples.calibration) == 5
    assert not set(first(samples.evaluation)) & set(first(samples.calibration))
    assert sorted(first(samples.evaluation) + first(samples.calibration)) == list(range(0, 40, 4))
    assert first(again.evaluation) == first(samples.evaluation)
    assert samples.source == str(tmp_path / "data.npz") and samples.warnings == []


def test_calibration_is_capped_and_every_other_sample_evaluates():
    feeds = [{"x": np.full((1, 4), i, np.float32)} for i in range(300)]
    calibration, evaluation = data.split(feeds)
    assert len(calibration) == data.MAX_CALIBRATION and len(evaluation) == 300 - 64
    calibration, evaluation = data.split(feeds[:11])
    assert (len(calibration), len(evaluation)) == (5, 6)


def test_a_single_sample_only_evaluates(tmp_path, caplog):
    samples = data.load_samples(_hook(), _stacked(tmp_path, 1), INPUTS)
    assert len(samples.evaluation) == 1 and samples.calibration == []
    assert any("none for calibration" in w for w in samples.warnings)


def test_no_data_means_random_inputs_and_a_loud_warning(caplog):
    inputs = [
        {"name": "x", "dtype": "float32", "shape": [2, 3]},
        {"name": "ids", "dtype": "int64", "shape": [1, 5]},
    ]
    with caplog.at_level(logging.WARNING):
        samples = data.load_samples(_hook(), None, inputs)
    assert samples.source == "random"
    assert len(samples.evaluation) + len(samples.calibration) == data.RANDOM_SAMPLES
    feed = samples.evaluation[0]
    assert feed["x"].shape == (2, 3) and feed["x"].dtype == np.float32
    assert feed["ids"].dtype == np.int64 and set(np.unique(feed["ids"])) <= {0, 1}
    assert "RANDOM inputs" in samples.warnings[0]
    assert "RANDOM inputs" in caplog.text


def test_dynamic_dims_need_an_input_shape():
    with pytest.raises(InputError) as info:
        data.load_samples(_hook(), None, INPUTS)
    assert str(info.value) == (
        "input 'x' has dynamic dims (batchx4): without --data, give its shape with "
        "--input-shape x:<batch>x4"
    )
    samples = data.load_samples(_hook(), None, INPUTS, {"x": (3, 4)})
    assert samples.evaluation[0]["x"].shape == (3, 4)


def test_input_shape_must_fit_the_model():
    with pytest.raises(InputError, match="does not fit the model's batchx4"):
        data.load_samples(_hook(), None, INPUTS, {"x": (1, 5)})
    with pytest.raises(InputError, match="the model has no such input"):
        data.load_samples(_hook(), None, INPUTS, {"y": (1, 4)})


@pytest.mark.parametrize("text", ["x", "x:", "x:1xb", ":1x4", "x:0x4"])
def test_bad_input_shape_text(text):
    with pytest.raises(InputError, match="expected NAME:DIMxDIM"):
        data.parse_input_shape(text)


def test_input_shape_text():
    assert data.parse_input_shape("input:1x3x224x224") == ("input", (1, 3, 224, 224))
    assert data.parse_input_shape("ns:x:2X4") == ("ns:x", (2, 4))


def test_missing_data_path(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        data.load_samples(_hook(), tmp_path / "nothing.npz", INPUTS)


def test_a_path_no_plugin_reads(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3,4\n")
    with pytest.raises(InputError, match="no data plugin reads this"):
        data.load_samples(_hook(), path, INPUTS)


class CsvData:
    """A data plugin for .csv files: one sample per line."""

    @hookimpl
    def slimfleet_load_data(self, path, inputs):
        if path.suffix != ".csv":
            return None
        rows = [line.split(",") for line in path.read_text().splitlines()]
        return [{inputs[0]["name"]: np.array([row], dtype=np.float32)} for row in rows]


def test_a_data_plugin_takes_its_own_files(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3,4\n5,6,7,8\n9,10,11,12\n")
    samples = data.load_samples(_hook(CsvData()), path, INPUTS)
    assert len(samples.evaluation) == 2 and len(samples.calibration) == 1
    # .npz still goes to the built-in reader, which runs last
    assert len(data.load_samples(_hook(CsvData()), _stacked(tmp_path, 4), INPUTS).evaluation) == 2


def test_feeds_from_plugins_are_checked(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(
        InputError, match="sample 0: input 'x' expects float32 batchx4, got float32 1x3"
    ):
        data.load_samples(_hook(CsvData()), path, INPUTS)


def test_input_shape_is_ignored_with_data(tmp_path):
    samples = data.load_samples(_hook(), _stacked(tmp_path, 4), INPUTS, {"x": (1, 4)})
    assert any("ignored with --data" in w for w in samples.warnings)


def test_show_shape():
    assert data.show_shape([1, "width", None]) == "1xwidthx?"
    assert data.show_shape([]) == "scalar"
    assert data.show_shape(None) == "?"


def test_samples_holding_nan_are_warned_about(tmp_path):
    # every candidate was rejected and nothing said why the data was to blame
    x = np.ones((6, 4), np.float32)
    x[2, 1] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    samples = data.load_samples(_hook(), tmp_path / "d.npz", INPUTS)
    assert any("1 of 6 samples hold NaN or Inf (first: sample 2)" in w for w in samples.warnings)
