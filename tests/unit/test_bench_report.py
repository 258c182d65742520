"""Benchmark output helpers."""

from __future__ import annotations

import json
import math

import pytest

from shepherd.bench.report import fmt, fmt_ratio, render_table, write_json


def test_fmt_formats_numbers_and_marks_missing() -> None:
    assert fmt(1234.567, 1) == "1,234.6"
    assert fmt(2.0, 0, " ms") == "2 ms"
    assert fmt(None) == "-"
    assert fmt(math.nan) == "-"


def test_fmt_ratio() -> None:
    assert fmt_ratio(3.0, 2.0) == "1.50x"
    assert fmt_ratio(1.0, 0.0) == "-"
    assert fmt_ratio(None, 1.0) == "-"
    assert fmt_ratio(math.nan, 1.0) == "-"


def test_render_table_aligns_columns() -> None:
    text = render_table(["name", "value"], [["a", "1"], ["longer", "1,000"]], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1] == "name    value"
    assert lines[2] == "------  -----"
    assert lines[3] == "a           1"
    assert lines[4] == "longer  1,000"


def test_render_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError):
        render_table(["a", "b"], [["only one"]])


def test_write_json_creates_directories_and_nulls_nan(tmp_path) -> None:
    target = tmp_path / "deep" / "report.json"
    write_json(target, {"x": math.nan, "y": [1, 2.5]})
    assert json.loads(target.read_text()) == {"x": None, "y": [1, 2.5]}
