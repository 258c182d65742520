"""The configuration reference documents every flag `shepherd launch` and `shepherd serve` accept."""

from pathlib import Path

import pytest

from shepherd.cli import build_parser

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


def _flags(command: str) -> list[str]:
    subparsers = build_parser()._subparsers._group_actions[0]
    parser = subparsers.choices[command]
    return [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]


@pytest.mark.parametrize("command", ["launch", "serve"])
def test_every_flag_is_documented(command):
    missing = [flag for flag in _flags(command) if flag != "--help" and f"`{flag}" not in DOC]
    assert missing == []
