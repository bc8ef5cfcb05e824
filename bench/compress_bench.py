"""Benchmark: slimfleet's choice against fp32 and the peers on ddddocr's two models.

For ddddocr's ``common.onnx`` (Conv + LSTM OCR) and ``common_det.onnx`` (YOLO-like
detector) it generates captcha images, runs ``slimfleet compress`` (as a user does, in a
child process whose peak RSS is sampled) on one set, and judges the original, slimfleet's
choice and the peers (``peers``: onnxruntime's quantizer, NNCF, when the ``bench`` extra
is installed) on another, held-out set with the same task metrics: for the OCR model
greedy-CTC decoded text equality with fp32 (blank index 0, as ddddocr decodes) and
per-step argmax agreement, for the detector the output cosine.

The OCR captchas are the kind a user relies on the model for: plain 4-character
captchas, kept only when fp32 reads them right (it reads about 93% of them, case aside),
and compress runs with the goal's budget (``--fidelity 0.98``). Texts are judged exactly
and, beside that, with letter case folded (ddddocr's charset holds ``c`` and ``C`` as two
classes fp32 scores as near-ties); ``--case-insensitive`` makes compress (and the goal)
judge them that way (``--metric ...,labels=charset.json,case=insensitive``).
``--distorted`` uses the captcha package's distorted defaults instead, where fp32 misreads
about three in four. The detector runs with defaults.
Latency is the 1-thread median, runs interleaved round-robin so machine load hits all
models alike. Installs ddddocr and captcha with pip when they are missing.
Run: ``python bench/compress_bench.py [--model common] [--case-insensitive] [--json]``.
"""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import judging
import numpy as np
from benchlib import GIB, CompressRun, Row, cpu_note, format_table, read_right, session
from sidebyside import Limits, compare

PACKAGES = {"ddddocr": "ddddocr", "captcha": "captcha", "cv2": "opencv-python-headless"}
CHARS = "abcdefghijkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
OCR_HEIGHT = 64  # ddddocr resizes to 64 pixels high, keeps the aspect ratio, grayscale
CAPTCHA_SIZE = (160, 60)  # fixed, so every OCR sample is 64x170 and they stack
READABLE_SIZE = (200, 60)  # 4 characters with room between them: 64x213 samples
SERIF_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"
DET_SIDE = 416  # ddddocr pads BGR images to 416x416 with value 114
DET_CAPTCHA_SIZE = (320, 160)


def ensure_packages() -> None:
    """pip-install what the benchmark needs into this interpreter when it is missing."""
    missing = [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        click.echo(f"installing {', '.join(missing)} ...", err=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


class _SeededSecrets:
    """captcha draws from ``secrets``; this stand-in makes the images reproducible."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._random.randrange(n)

    def randbits(self, k: int) -> int:
        return self._random.getrandbits(k)

    def choice(self, items):
        return self._random.choice(items)


def _captchas(count: int, seed: int, generator, length: tuple[int, int]):
    """``(text, image)`` pairs: ``length`` random characters drawn by ``generator`` (a
    ``captcha.image.ImageCaptcha``), reproducibly from ``seed``."""
    import captcha.image

    captcha.image.secrets = _SeededSecrets(seed)
    texts = random.Random(seed + 1)
    for _ in range(count):
        text = "".join(texts.choice(CHARS) for _ in range(texts.randint(*length)))
        yield text, generator.generate_image(text)


def _distorted(size: tuple[int, int]):
    """The captcha package as it comes: rotated (30 degrees), warped, dots and a curve."""
    import captcha.image

    return captcha.image.ImageCaptcha(width=size[0], height=size[1])


def _plain(size: tuple[int, int]):
    """Mild captchas in DejaVu Serif: rotated at most 10 degrees, barely warped, no noise."""
    import captcha.image

    class Plain(captcha.image.ImageCaptcha):
        character_rotate = (-10, 10)
        character_warp_dx = character_warp_dy = (0.0, 0.05)

        @staticmethod
        def create_noise_curve(image, color):
            return image

        @staticmethod
        def create_noise_dots(image, color, width=3, number=30):
            return image

    fonts = [SERIF_FONT] if Path(SERIF_FONT).exists() else None
    if fonts is None:
        click.echo(f"  {SERIF_FONT} is missing: the captcha package's own font", err=True)
    return Plain(width=size[0], height=size[1], fonts=fonts)


def _ocr_input(image) -> np.ndarray:
    """``[1, 1, 64, W]`` float input for common.onnx, as ddddocr preprocesses an image."""
    width = int(image.size[0] * OCR_HEIGHT / image.size[1])
    gray = image.resize((width, OCR_HEIGHT)).convert("L")
    return (np.asarray(gray, np.float32) / 255.0)[None, None]


def ocr_samples(count: int, seed: int) -> list[np.ndarray]:
    """Distorted captchas (4-6 characters squeezed into 160x60): ``[1, 1, 64, 170]``
    inputs for common.onnx, about three in four of which fp32 misreads."""
    pairs = _captchas(count, seed, _distorted(CAPTCHA_SIZE), (4, 6))
    return [_ocr_input(image) for _, image in pairs]


def readable_ocr_samples(count: int, seed: int) -> list[np.ndarray]:
    """``count`` plain 4-character captchas that fp32 common.onnx reads right (case
    aside), the kind its users rely on it for: ``[1, 1, 64, 213]`` inputs. Prints how many
    it drew to find them (fp32 reads about 93%); refuses when it reads under a quarter."""
    fp32 = session(Path(importlib.import_module("ddddocr").__file__).parent / "common.onnx")

    def read(x: np.ndarray) -> str:
        (ids,) = judging.greedy_ctc(fp32.run(None, {"input1": x})[0], time_axis=0, blank=0)
        return _caseless(ids)

    drawn = _captchas(4 * count, seed, _plain(READABLE_SIZE), (4, 4))
    pairs = ((text.casefold(), _ocr_input(image)) for text, image in drawn)
    samples, tried = read_right(pairs, read, count)
    if len(samples) < count:
        raise click.ClickException(f"fp32 read only {len(samples)} of {tried} captchas right")
    click.echo(f"  fp32 read {count} of the first {tried} captchas right (seed {seed})", err=True)
    return samples


def det_samples(count: int, seed: int) -> list[np.ndarray]:
    """``[1, 3, 416, 416]`` inputs for common_det.onnx, as ddddocr preprocesses them."""
    import cv2

    samples = []
    for _, image in _captchas(count, seed, _distorted(DET_CAPTCHA_SIZE), (4, 6)):
        bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
        scale = min(DET_SIDE / bgr.shape[0], DET_SIDE / bgr.shape[1])
        resized = cv2.resize(
            bgr, (int(bgr.shape[1] * scale), int(bgr.shape[0] * scale)), cv2.INTER_LINEAR
        )
        padded = np.full((DET_SIDE, DET_SIDE, 3), 114, np.uint8)
        padded[: resized.shape[0], : resized.shape[1]] = resized
        samples.append(np.ascontiguousarray(padded.transpose(2, 0, 1), np.float32)[None])
    return samples


def _charset() -> list[str]:
    """What each class of common.onnx spells (it is ddddocr's "beta" model)."""
    import ddddocr.charsets

    return ddddocr.charsets.CHARSET_BETA


def _caseless(ids: tuple[int, ...]) -> str:
    """The text common.onnx's class ids spell, letter case folded."""
    charset = _charset()
    return "".join(charset[i] for i in ids).casefold()


EXACT_TEXT = judging.ctc_text(time_axis=0, blank=0)
CASELESS_TEXT = judging.ctc_text(
    time_axis=0, blank=0, spell=_caseless, name="text equality, case aside"
)


@dataclass(frozen=True)
class Case:
    file: str
    what: str
    samples: Callable[[int, int], list[np.ndarray]]
    judges: tuple[judging.Judge, ...]
    """The first is the task metric the goal is on."""
    search_samples: int
    goals: tuple[float, float, float]
    """At least this much faster and smaller than fp32, and this task metric."""
    fidelity: float | None = None
    """compress's ``--fidelity`` when the goal's budget is not the default 0.99."""
    fold_case: bool = False
    """compress judges the texts with letter case folded (``--metric ...case=insensitive``,
    ddddocr's charset as the labels)."""


CASES = {
    "common": Case(
        "common.onnx",
        "Conv + LSTM OCR, captchas fp32 reads right",
        readable_ocr_samples,
        (EXACT_TEXT, CASELESS_TEXT, judging.step_agreement()),
        300,
        (2.0, 3.0, 0.98),
        fidelity=0.98,
    ),
    "det": Case(
        "common_det.onnx",
        "YOLO-like detector",
        det_samples,
        (judging.cosine(),),
        64,
        (2.0, 3.5, 0.99),
    ),
}


def bench(name: str, case: Case, limits: Limits, test_count: int, workdir: Path):
    import ddddocr

    source = Path(ddddocr.__file__).parent / case.file
    input_name = session(source).get_inputs()[0].name
    search = [{input_name: x} for x in case.samples(case.search_samples, 1)]
    held_out = [{input_name: x} for x in case.samples(test_count, 2)]
    args = [] if case.fidelity is None else ["--fidelity", str(case.fidelity)]
    if case.fold_case:
        labels = workdir / "charset.json"
        labels.write_text(json.dumps(_charset()))
        output = session(source).get_outputs()[0].name
        args += ["--metric", f"{output}=ctc:blank=0,labels={labels},case=insensitive"]
    return compare(case.file, source, search, held_out, case.judges, limits, workdir, args)


def show(case: Case, rows: list[Row], run: CompressRun, test_count: int) -> None:
    click.echo(f"\n{case.file} ({case.what}): {test_count} held-out captchas, 1 thread")
    for line in format_table(rows):
        click.echo(f"  {line}")
    ours = next(r for r in rows if r.variant == "slimfleet")
    if ours.error:
        return
    base = rows[0]
    faster, smaller = base.latency_ms / ours.latency_ms, base.size_mb / ours.size_mb
    metric = float(ours.scores[0].split(" of ")[0].split()[-1])
    want = case.goals
    met = [faster >= want[0], smaller >= want[1], metric >= want[2]]
    click.echo(
        f"  goals: >= {want[0]}x faster {'met' if met[0] else 'MISSED'}, >= {want[1]}x smaller "
        f"{'met' if met[1] else 'MISSED'}, {case.judges[0].name} >= {want[2]} "
        f"{'met' if met[2] else 'MISSED'}"
    )
    click.echo("  its search (on the search's own evaluation samples):")
    for c in run.report.get("candidates", []):
        median = (c.get("latency_ms") or {}).get("median")
        score = (c.get("fidelity") or {}).get("score")
        size = c.get("size_bytes")
        click.echo(
            f"    #{c['id']:<3}{c['status']:<9}{_num(median, '.2f', 'ms'):>10}"
            f"{_num(size and size / 1e6, '.1f', 'MB'):>9}"
            f"{_num(score, '.4f', ''):>8}  {c['label'][:90]}"
        )


def _num(value: float | None, spec: str, unit: str) -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    "names",
    multiple=True,
    type=click.Choice(sorted(CASES)),
    help="Benchmark only this model (repeatable); default: all.",
)
@click.option("--rounds", default=200, show_default=True, help="Timed runs per model.")
@click.option(
    "--test-samples",
    default=250,
    show_default=True,
    help="Held-out captchas for the task metric (and latency inputs).",
)
@click.option("--no-peers", is_flag=True, help="Skip the onnxruntime/NNCF peers.")
@click.option(
    "--distorted",
    is_flag=True,
    help="Judge common.onnx on distorted captchas (4-6 characters in 160x60) instead, "
    "most of which fp32 misreads.",
)
@click.option(
    "--case-insensitive",
    is_flag=True,
    help="compress judges common.onnx's texts with letter case folded, and so does the goal.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON at the end.")
def main(
    names: tuple[str, ...],
    rounds: int,
    test_samples: int,
    no_peers: bool,
    distorted: bool,
    case_insensitive: bool,
    as_json: bool,
):
    """Compare slimfleet's choice with fp32 and the peers on ddddocr's models."""
    cases = dict(CASES)
    if distorted:
        cases["common"] = replace(
            cases["common"], what="Conv + LSTM OCR, distorted captchas", samples=ocr_samples
        )
    if case_insensitive:
        common = cases["common"]
        cases["common"] = replace(
            common,
            what=f"{common.what}, texts judged case aside",
            judges=(CASELESS_TEXT, EXACT_TEXT, judging.step_agreement()),
            fold_case=True,
        )
    ensure_packages()
    click.echo(f"compress bench: {cpu_note()}", err=True)
    limits = Limits(rounds, 900, 600, 8 * GIB, peers=not no_peers)
    everything: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="slimfleet-bench-") as tmp:
        for name in names or tuple(CASES):
            case = cases[name]
            workdir = Path(tmp) / name
            workdir.mkdir()
            rows, run = bench(name, case, limits, test_samples, workdir)
            show(case, rows, run, test_samples)
            everything += rows
    if as_json:
        click.echo(json.dumps([asdict(r) for r in everything], indent=1))


if __name__ == "__main__":
    main()
