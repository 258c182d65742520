"""Benchmarks: `shepherd bench <name>`. Each module registers its own subcommand."""

from __future__ import annotations

import argparse


def register_benchmarks(subparsers: argparse._SubParsersAction) -> None:
    """Add every benchmark's subcommand; each sets `run` (args -> exit code) with `set_defaults`."""
    from shepherd.bench import grpc_path, overhead, policy, routing, scale

    for register in (overhead.register, grpc_path.register, policy.register, routing.register, scale.register):
        register(subparsers)
