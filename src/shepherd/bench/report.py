"""Benchmark output: an aligned terminal table and a JSON document (shared by every `shepherd bench` command)."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

MISSING = "-"


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A number for a table cell; `-` for missing or NaN values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:,.{digits}f}{suffix}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    """`a / b` as `1.23x`; `-` when either side is missing or the denominator is zero."""
    if numerator is None or denominator is None or math.isnan(numerator) or math.isnan(denominator):
        return MISSING
    if denominator == 0:
        return MISSING
    return f"{numerator / denominator:.2f}x"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """Columns sized to their widest cell; the first column left-aligned, the others right-aligned (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out)


def run_metadata() -> dict[str, Any]:
    """Where and when a benchmark ran, recorded beside its figures."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def write_json(path: str | os.PathLike[str], document: Any) -> None:
    """Write `document` as indented JSON (NaN becomes null), creating parent directories."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")


def run_and_report(
    command: str,
    run: Callable[[Callable[[str], None]], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    output: str | None,
) -> dict[str, Any] | None:
    """Run a benchmark with progress on stderr, print its table and write its JSON; None (after saying why on
    stderr) when the fleet or a gateway could not be started."""
    from shepherd.bench.fleet import FleetError

    try:
        document = run(lambda line: print(line, file=sys.stderr, flush=True))
    except FleetError as exc:
        print(f"shepherd bench {command}: {exc}", file=sys.stderr)
        return None
    print(render(document))
    if output:
        write_json(output, document)
        print(f"\nJSON report: {output}")
    return document
