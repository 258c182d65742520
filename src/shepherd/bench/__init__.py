"""Benchmarks: `shepherd bench <name>`. Each module registers its own subcommand."""

from __future__ import annotations

import argparse


def register_benchmarks(subparsers: argparse._SubParsersAction) -> None:
    # Benchmark modules are imported lazily by their registration functions' callers.
    return None
