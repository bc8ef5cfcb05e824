from __future__ import annotations

import numpy as np
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.plugins.npzdata import slimfleet_load_data

IMAGE = [{"name": "image", "dtype": "float32", "shape": [1, 1, 8, "width"]}]
VECTOR = [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]
RNG = np.random.default_rng(1)


def _floats(*shape: int) -> np.ndarray:
    return RNG.random(shape).astype(np.float32)


def test_stacked_samples_with_an_extra_axis(tmp_path):
    path = tmp_path / "data.npz"
    stacked = _floats(5, 1, 1, 8, 20)
    np.savez(path, image=stacked)
    feeds = slimfleet_load_data(path=path, inputs=IMAGE)
    assert len(feeds) == 5
    assert feeds[3]["image"].shape == (1, 1, 8, 20)
    np.testing.assert_array_equal(feeds[3]["image"], stacked[3])


def test_stacked_samples_of_the_model_rank_become_batches_of_one(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=_floats(6, 4))
    feeds = slimfleet_load_data(path=path, inputs=VECTOR)
    assert [f["x"].shape for f in feeds] == [(1, 4)] * 6


def test_directory_of_samples_with_varying_shapes(tmp_path):
    for i, width in enumerate([12, 30, 17]):
        np.savez(tmp_path / f"s{i}.npz", image=_floats(1, 1, 8, width))
    np.savez(tmp_path / "s3.npz", image=_floats(1, 8, 9))  # no batch axis: one is added
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = slimfleet_load_data(path=tmp_path, inputs=IMAGE)
    assert [f["image"].shape[-1] for f in feeds] == [12, 30, 17, 9]
    assert feeds[3]["image"].shape == (1, 1, 8, 9)


def test_other_paths_are_left_to_other_plugins(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    assert slimfleet_load_data(path=path, inputs=VECTOR) is None


def test_wrong_key_names_the_keys(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, input=_floats(3, 4))
    with pytest.raises(InputError) as info:
        slimfleet_load_data(path=path, inputs=VECTOR)
    assert str(info.value) == (
        f"{path}: keys do not match the model inputs ['x'] (missing 'x'; unexpected 'input')"
    )


def test_wrong_shape_names_key_expected_and_got(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=_floats(3, 5))
    with pytest.raises(InputError) as info:
        slimfleet_load_data(path=path, inputs=VECTOR)
    assert str(info.value) == (
        f"{path} sample 0: input 'x' expects float32 batchx4, got float32 1x5"
    )


def test_wrong_rank_says_how_samples_are_stacked(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, image=_floats(8, 20))
    with pytest.raises(InputError, match=r"key 'image' has shape 8x20; expected samples stacked"):
        slimfleet_load_data(path=path, inputs=IMAGE)


def test_float64_becomes_float32_but_floats_never_become_integers(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=RNG.random((3, 4)))  # float64, as numpy makes by default
    (feed, *_) = slimfleet_load_data(path=path, inputs=VECTOR)
    assert feed["x"].dtype == np.float32
    ids = [{"name": "x", "dtype": "int64", "shape": ["batch", 4]}]
    with pytest.raises(InputError, match="expects int64 batchx4, got float64 1x4"):
        slimfleet_load_data(path=path, inputs=ids)


def test_keys_with_different_sample_counts(tmp_path):
    inputs = [*VECTOR, {"name": "y", "dtype": "float32", "shape": ["batch", 2]}]
    path = tmp_path / "data.npz"
    np.savez(path, x=_floats(3, 4), y=_floats(2, 2))
    with pytest.raises(InputError, match="different sample counts"):
        slimfleet_load_data(path=path, inputs=inputs)


def test_bad_file_in_a_directory_is_named(tmp_path):
    np.savez(tmp_path / "a.npz", image=_floats(1, 1, 8, 10))
    np.savez(tmp_path / "b.npz", image=_floats(1, 1, 9, 10))
    with pytest.raises(InputError, match=r"b\.npz: input 'image' expects float32 1x1x8xwidth"):
        slimfleet_load_data(path=tmp_path, inputs=IMAGE)


def test_corrupt_npz(tmp_path):
    path = tmp_path / "data.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"data\.npz: not an \.npz file"):
        slimfleet_load_data(path=path, inputs=VECTOR)


def test_missing_npz(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        slimfleet_load_data(path=tmp_path / "gone.npz", inputs=VECTOR)


def test_empty_directory(tmp_path):
    with pytest.raises(InputError, match=r"no \.npz files"):
        slimfleet_load_data(path=tmp_path, inputs=VECTOR)


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match=r"holds object arrays \(pickled Python objects\)"):
        slimfleet_load_data(path=path, inputs=VECTOR)


def test_a_file_that_is_not_a_zip_is_not_called_pickled(tmp_path):
    # np.load falls back to unpickling anything that is neither .npz nor .npy, and its
    # error advised allow_pickle=True for a plain text file
    path = tmp_path / "notes.npz"
    path.write_text("just text\n")
    with pytest.raises(InputError, match=r"notes.npz: not an .npz file \(numpy.savez"):
        slimfleet_load_data(path=path, inputs=VECTOR)
