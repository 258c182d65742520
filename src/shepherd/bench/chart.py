"""PNG chart of a `shepherd bench routing` report: per workload, hit rate and TTFT per gateway.

matplotlib comes with the `bench` extra and is imported only here, when a chart is asked for.
"""

from __future__ import annotations

import os
from typing import Any


def write_chart(document: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """One row per workload: hit rate bars with the bounds as lines, and TTFT p50/p99 bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    results = document["results"]
    pd = document["settings"]["pd"]
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.6 * len(results)), squeeze=False)
    for row, (name, result) in zip(axes, results.items(), strict=True):
        gateways = list(result["gateways"])
        positions = range(len(gateways))
        hit_axis, ttft_axis = row

        hits = [result["gateways"][g]["hit_rate"] or 0.0 for g in gateways]
        bars = hit_axis.bar(positions, hits, color="tab:blue")
        hit_axis.bar_label(bars, fmt="%.2f", fontsize=8)
        limits = result["bounds"]
        hit_axis.axhline(limits["infinite_cache"], color="black", linestyle="--", linewidth=1, label="infinite cache")
        hit_axis.axhline(
            limits["fleet_capacity"], color="tab:red", linestyle=":", linewidth=1, label="fleet capacity (Belady)"
        )
        hit_axis.set_ylim(0, 1.05)
        hit_axis.set_title(f"{name}{' (PD)' if pd else ''}: {'prefill ' if pd else ''}prefix-cache hit rate")
        hit_axis.legend(loc="lower right", fontsize=8)

        width = 0.4
        for offset, (key, color) in ((-width / 2, ("p50", "tab:green")), (width / 2, ("p99", "tab:orange"))):
            values = [(result["gateways"][g]["ttft_ms"] or {}).get(key) or 0.0 for g in gateways]
            bars = ttft_axis.bar([p + offset for p in positions], values, width, label=f"TTFT {key}", color=color)
            ttft_axis.bar_label(bars, fmt="%.0f", fontsize=8)
        ttft_axis.set_title(f"{name}: time to first token (ms)")
        ttft_axis.legend(fontsize=8)

        for axis in row:
            axis.set_xticks(list(positions), gateways, rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
