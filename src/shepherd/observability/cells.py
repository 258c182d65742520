"""Metric cells cheap enough for the request path, and their labeled families.

A cell is a plain object updated in place: a counter is an int add, a histogram a bisect into its bucket
list. There are no locks because the gateway updates and scrapes them on one event loop thread, and no label
handling on the request path: callers look a cell up once (per worker, per route) and keep it. At scrape
time each family renders itself as a `prometheus_client` metric family, which does the text formatting.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LabelValues = tuple[str, ...]


class Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class Distribution:
    """Observations bucketed by upper bound (`le`); the last slot counts values above every bound."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count of observations <= le) pairs, ending with +Inf, as Prometheus wants them."""
        buckets = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        return buckets


class _Family:
    """Children keyed by label values; created on first use and kept until removed."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[LabelValues, Count | Distribution] = {}

    def remove_matching(self, label: str, value: str) -> None:
        """Drop every child whose `label` equals `value` (e.g. all series of a removed worker)."""
        index = self.labelnames.index(label)
        for key in [k for k in self.children if k[index] == value]:
            del self.children[key]


class CounterFamily(_Family):
    def child(self, *values: str) -> Count:
        cell = self.children.get(values)
        if cell is None:
            cell = self.children[values] = Count()
        return cell  # type: ignore[return-value]

    def collect(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, cell in self.children.items():
            family.add_metric(values, cell.value)  # type: ignore[union-attr]
        return family


class HistogramFamily(_Family):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], bounds: Sequence[float]) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(b) for b in bounds)

    def child(self, *values: str) -> Distribution:
        cell = self.children.get(values)
        if cell is None:
            cell = self.children[values] = Distribution(self.bounds)
        return cell  # type: ignore[return-value]

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, cell in self.children.items():
            family.add_metric(values, cell.cumulative(), cell.sum)  # type: ignore[union-attr]
        return family
