"""tensorsizes: activation sizes from shape inference, and batching under a limit."""

from __future__ import annotations

import models
import numpy as np

from slimfleet.host.compress import tensorsizes


def test_tensor_sizes_come_from_shape_inference_on_the_sample_shapes():
    sizes = tensorsizes.tensor_bytes(models.mlp(), {"x": np.ones((5, 64), np.float32)}, ["h", "y"])
    assert sizes == {"h": 5 * 128 * 4, "y": 5 * 10 * 4}


def test_batches_stay_within_the_limit():
    sizes = {"a": 4, "b": 4, "c": 10, "d": 1}
    assert tensorsizes.batches(sizes, 8) == [["a", "b"], ["c"], ["d"]]
    assert tensorsizes.batches(sizes, 100) == [["a", "b", "c", "d"]]


def test_unknown_sizes_are_assumed_as_large_as_the_largest_known():
    sizes = tensorsizes.tensor_bytes(models.mlp(), {"x": np.ones((5, 64), np.float32)}, ["nope"])
    assert sizes == {"nope": 5 * 128 * 4}


def test_activation_bytes_sum_every_node_output():
    feed = {"x": np.ones((2, 64), np.float32)}
    # h, hb, r: 2x128; o, y: 2x10 (float32)
    assert tensorsizes.activation_bytes(models.mlp(), feed) == 4 * (3 * 2 * 128 + 2 * 2 * 10)
