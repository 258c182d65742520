"""Merge several Prometheus text expositions into one, labeling every sample with its source.

Each source's samples get `worker_addr="<source>"`. Families with the same name are merged so the output
has one HELP/TYPE block per family and every family's samples together, which the text format requires.
Sample lines are re-rendered (labels sorted with `le`/`quantile` last, values in Go float notation, as
SMG does); HELP text and label values keep the exact escaping the worker used.

The parser is deliberately lenient where engines differ (a counter declared as `x` whose samples are named
`x_total`) and strict where the output could become invalid: a line it cannot parse is dropped, and a
family a source declares with a different type than an earlier source is dropped for that source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

# What both exposition endpoints produce: the classic text format with legacy (non-UTF-8) names.
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PAIR = r'[a-zA-Z_][a-zA-Z0-9_]*\s*=\s*"(?:[^"\\]|\\.)*"'
_SAMPLE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)"  # metric name
    rf"(?:\{{\s*((?:{_PAIR})(?:\s*,\s*{_PAIR})*)?\s*,?\s*\}})?"  # optional label set
    r"\s+(\S+)(?:\s+(-?\d+))?\s*"  # value, optional timestamp (ms)
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_SOURCE_LABEL = "worker_addr"
_LAST_LABELS = ("le", "quantile")
_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
# Sample-name suffixes that belong to a family of each type.
_SUFFIXES = {
    "counter": ("", "_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "untyped": ("",),
}


@dataclass(slots=True)
class Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    samples: list[str] = field(default_factory=list)
    sample_names: set[str] = field(default_factory=set)

    def exposed_name(self) -> str:
        """The name to declare: a counter declared as `x` whose samples are all `x_total` becomes `x_total`,
        so HELP/TYPE and samples agree for every parser."""
        total = self.name + "_total"
        if self.type == "counter" and self.sample_names == {total}:
            return total
        return self.name


@dataclass(slots=True)
class MergeResult:
    text: str
    families: int
    dropped_lines: int


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def merge_expositions(sources: Iterable[tuple[str, str]], header: Iterable[str] = ()) -> MergeResult:
    """One exposition from (source address, exposition text) pairs; `header` lines become leading comments."""
    merged: dict[str, Family] = {}
    dropped = 0
    for address, text in sources:
        dropped += _merge_one(merged, escape_label_value(address), text)
    out = [f"# {line}" for line in header]
    if out:
        out.append("")
    for family in merged.values():
        if family.help is not None:
            out.append(f"# HELP {family.name} {family.help}")
        out.append(f"# TYPE {family.name} {family.type}")
        out.extend(family.samples)
        out.append("")
    return MergeResult("\n".join(out) + ("\n" if out else ""), len(merged), dropped)


def _merge_one(merged: dict[str, Family], address: str, text: str) -> int:
    """Add one source's families to `merged`; returns how many lines were dropped."""
    own: dict[str, Family] = {}  # this source's families, merged into `merged` at the end
    current: Family | None = None
    dropped = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue  # a plain comment
            name = parts[2]
            current = own.get(name) or own.setdefault(name, Family(name))
            if parts[1] == "HELP":
                current.help = parts[3] if len(parts) == 4 else ""
            else:
                kind = parts[3].lower() if len(parts) == 4 else "untyped"
                current.type = kind if kind in _TYPES else "untyped"
            continue
        match = _SAMPLE.fullmatch(line)
        if match is None:
            dropped += 1
            continue
        name, labels, value, timestamp = match.groups()
        try:
            rendered_value = floatToGoString(float(value))
        except ValueError:
            dropped += 1
            continue
        family = current if current is not None and _belongs(name, current) else None
        if family is None:
            family = own.get(name) or own.setdefault(name, Family(name))
            current = family
        family.samples.append(_render(name, labels, address, rendered_value, timestamp))
        family.sample_names.add(name)
    for family in own.values():
        name = family.name = family.exposed_name()
        target = merged.get(name)
        if target is None:
            merged[name] = family
        elif target.type != family.type:
            dropped += len(family.samples)
        else:
            if target.help is None:
                target.help = family.help
            target.samples.extend(family.samples)
    return dropped


def _belongs(sample_name: str, family: Family) -> bool:
    base = family.name
    if family.type == "counter" and base.endswith("_total"):
        base = base[: -len("_total")]
    return any(sample_name == base + suffix for suffix in _SUFFIXES[family.type]) or sample_name == family.name


def _render(name: str, labels: str | None, address: str, value: str, timestamp: str | None) -> str:
    pairs = dict(_LABEL.findall(labels)) if labels else {}
    pairs[_SOURCE_LABEL] = address
    ordered = sorted(pairs.items(), key=lambda kv: (kv[0] in _LAST_LABELS, kv[0]))
    label_text = ",".join(f'{k}="{v}"' for k, v in ordered)
    line = f"{name}{{{label_text}}} {value}"
    return f"{line} {timestamp}" if timestamp else line
