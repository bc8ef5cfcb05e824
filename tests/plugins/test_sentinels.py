"""What counts as a value int8 cannot carry: masks yes, large real activations no."""

from __future__ import annotations

import numpy as np
import pytest

from slimfleet.plugins.sentinels import SentinelWatch, sentinels

RNG = np.random.default_rng(0)
SCORES = RNG.normal(0, 5, (4, 16)).astype(np.float32)
PADDED = np.arange(16) >= 11


def masked(value: float) -> np.ndarray:
    return np.where(PADDED, SCORES + value, SCORES).astype(np.float32)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (masked(-np.inf), PADDED),  # masked_fill(-inf)
        (masked(-1e4), PADDED),  # BERT's -10000 plus each score: some fall below 10000
        (masked(np.finfo(np.float32).min), PADDED),
        (np.where(PADDED, -1e9, 0.0).astype(np.float32), PADDED),  # the mask alone
        (SCORES, None),
        (RNG.uniform(-30, 30, 256).astype(np.float32) ** 3, None),  # a cube's tail
        (np.array([183093.4], np.float32), None),  # a lone sum of squares
        (np.array([1.0, np.nan], np.float32), np.array([False, True])),
        (np.array([3, 7], np.int64), None),
    ],
)
def test_sentinels_are_non_finite_or_stand_apart(array, expected):
    found = sentinels(array)
    if expected is None:
        assert found is None
    else:
        assert found is not None
        np.testing.assert_array_equal(found, np.broadcast_to(expected, array.shape))


class _Session:
    """What a calibrator's session returns: min-max reads each tensor's min and max."""

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def run(self, names, feed):
        return [self.outputs[n] for n in names]


def test_min_max_outputs_of_one_tensor_are_judged_together():
    """Alone, a min of -10000 is just a large number; beside its tensor's max of 3 it is
    a mask. A cube's min and max (both large) are not."""
    session = _Session(
        {
            "m_ReduceMin": np.array([-10003.0], np.float32),
            "m_ReduceMax": np.array([3.0], np.float32),
            "c_ReduceMin": np.array([-27000.0], np.float32),
            "c_ReduceMax": np.array([26000.0], np.float32),
        }
    )
    watch = SentinelWatch(session, ("_ReduceMin", "_ReduceMax"))
    outputs = watch.run(list(session.outputs), {})
    assert watch.names == {"m"}
    assert [float(o[0]) for o in outputs] == [0.0, 3.0, -27000.0, 26000.0]
