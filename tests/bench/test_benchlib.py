"""The benchmarks' table and their bounded child processes."""

from __future__ import annotations

import time

import benchlib
import numpy as np
from benchlib import GIB, Row


def test_table_writes_ratios_one_way_against_each_models_original() -> None:
    rows = [
        Row("m", "original", 40.0, 20.0, ["top-1 1.0000 of 8 rows"]),
        Row("m", "slimfleet", 10.0, 5.0, ["top-1 0.9900 of 8 rows"], GIB, 12.0, "int8"),
        Row("m", "ORT dynamic", 10.0, 40.0, ["top-1 0.9000 of 8 rows"]),
        Row("m", "NNCF PTQ", error="ValueError: no"),
        Row("n", "original", 2.0, 1.0),
    ]
    header, *lines = benchlib.format_table(rows)
    assert header.split()[:4] == ["model", "variant", "smaller", "faster"]
    assert lines[1].split()[2:4] == ["4.00x", "4.00x"]
    assert "1.00G" in lines[1] and "[int8]" in lines[1]
    assert lines[2].split()[3:5] == ["4.00x", "0.50x"]
    assert lines[3].endswith("FAILED: ValueError: no")
    assert lines[4].split()[2:4] == ["1.00x", "1.00x"]


def test_run_bounded_reports_an_exception_as_its_last_line() -> None:
    def fail() -> None:
        raise ValueError("bad\nthing")

    watched = benchlib.run_bounded(fail, timeout_s=30, max_rss=4 * GIB)
    assert watched.error == "ValueError: bad thing"


def test_run_bounded_kills_a_blow_up_and_a_hang() -> None:
    def hog() -> None:
        block = np.ones(400 << 20, np.uint8)  # 400 MB, touched
        time.sleep(30 + block[0])

    watched = benchlib.run_bounded(hog, timeout_s=20, max_rss=200 << 20)
    assert watched.error.startswith("killed at") and watched.seconds < 15
    watched = benchlib.run_bounded(lambda: time.sleep(30), timeout_s=0.5, max_rss=4 * GIB)
    assert watched.error.startswith("killed after") and watched.seconds < 10


def test_run_bounded_ok() -> None:
    assert benchlib.run_bounded(lambda: None, timeout_s=30, max_rss=4 * GIB).error is None


def test_a_long_model_name_keeps_its_columns_apart() -> None:
    rows = [Row("paraphrase-MiniLM-L3-v2", "original", 69.0, 19.0), Row("m", "original", 1.0, 1.0)]
    lines = benchlib.format_table(rows)
    assert lines[1].split()[:2] == ["paraphrase-MiniLM-L3-v2", "original"]
    assert len({line.index("original") for line in lines[1:]}) == 1
