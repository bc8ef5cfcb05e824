"""Every corpus case makes feeds of the shapes and dtypes its model declares."""

from __future__ import annotations

import json
from pathlib import Path

import corpus_inputs
import numpy as np
import pytest
from corpus_bench import CASES

# name -> {input: (dtype, shape with None for a dynamic dim)}, from public.json's inputs.
DECLARED = {
    "open_nsfw": {"input_0": ("float32", (1, 224, 224, 3))},
    "320n": {"images": ("float32", (1, 3, 320, 320))},
    "paraphrase-MiniLM-L3-v2": {
        "input_ids": ("int64", (1, None)),
        "attention_mask": ("int64", (1, None)),
    },
    "model@khmersm": {"x": ("int64", (1, None)), "mask": ("bool", (1, None))},
    "embedding_model": {"input_1": ("float32", (1, 76, 32, 1))},
    "hey_jarvis_v0.1": {"x.1": ("float32", (1, 16, 96))},
    "model@magika": {"bytes": ("int32", (1, 2048))},
    "downbeats_blstm_1": {
        "input": ("float32", (None, 314)),
        **{
            f"state_{n}_{kind}_in": ("float32", (25,))
            for n in (1, 2, 4, 5, 7, 8)
            for kind in ("hidden", "cell")
        },
    },
    "lac_encoder": {"token_ids": ("int64", (1, None)), "length": ("int64", (1,))},
    "captcha_crnn": {"image": ("float32", (1, 3, 60, 160))},
    "u2netp": {"input.1": ("float32", (1, 3, 320, 320))},
    "u2net": {"input.1": ("float32", (1, 3, 320, 320))},
    "logreg_iris": {"float_input": ("float32", (3, 2))},
    "bilstm.int8": {"input_ids": ("int64", (1, None))},
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A cache directory with the side files some generators read (khmersm's vocab)."""
    directory = tmp_path / "03-khmersm-model"
    directory.mkdir()
    vocab = {"<pad>": 0, "<unk>": 1, "ក": 2, "ខ": 3, "ា": 4, "_": 5}
    (directory / "config.json").write_text(json.dumps({"char2id": vocab}))
    return directory


def test_every_case_has_declared_inputs() -> None:
    assert set(CASES) == set(DECLARED)


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_feeds_fit_the_declared_inputs(name: str, model_dir: Path) -> None:
    made = CASES[name].make(3, 7, model_dir)
    assert len(made.feeds) == 3
    for feed in made.feeds:
        assert set(feed) == set(DECLARED[name])
        for input_name, (dtype, shape) in DECLARED[name].items():
            array = feed[input_name]
            assert array.dtype == np.dtype(dtype), input_name
            assert len(array.shape) == len(shape), input_name
            assert all(d is None or d == s for d, s in zip(shape, array.shape, strict=True))
            if array.dtype.kind == "f" and not input_name.startswith("state_"):
                assert np.isfinite(array).all() and array.std() > 0, input_name


def test_same_seed_same_feeds_other_seed_other_feeds(model_dir: Path) -> None:
    a, b, c = (corpus_inputs.captcha_crnn(2, s, model_dir).feeds for s in (1, 1, 2))
    assert np.array_equal(a[0]["image"], b[0]["image"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_khmer_ids_come_from_the_package_vocabulary(model_dir: Path) -> None:
    feeds = corpus_inputs.khmersm(4, 0, model_dir).feeds
    for feed in feeds:
        real = feed["x"][feed["mask"]]
        assert set(real.tolist()) <= {2, 3, 4}
        assert not feed["x"][~feed["mask"]].any()


def test_fallbacks_say_so(model_dir: Path) -> None:
    assert corpus_inputs.minilm(1, 0, model_dir).warnings
    assert "not in the cache" in corpus_inputs.hey_jarvis(1, 0, model_dir).warnings[0]
    assert not corpus_inputs.u2net(1, 0, model_dir).warnings


def test_magika_reads_real_bytes_with_pad_token(model_dir: Path) -> None:
    feed = corpus_inputs.magika(2, 0, model_dir).feeds[0]["bytes"]
    assert feed.min() >= 0 and feed.max() <= corpus_inputs.MAGIKA_PAD
    assert (feed < corpus_inputs.MAGIKA_PAD).sum() > 16
