"""Where the real components the integration tests need are (installed by `make components`, tools/components/)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

COMPONENTS = Path(os.environ.get("SHEPHERD_COMPONENTS", Path.home() / ".cache" / "shepherd-components"))


def require(name: str) -> Path:
    """The executable `name` from the components directory, else PATH; a missing one fails the test loudly."""
    built = COMPONENTS / "bin" / name
    if built.exists():
        return built
    found = shutil.which(name)
    if found:
        return Path(found)
    pytest.fail(f"{name} is not installed: run `make components` (tools/components/) first", pytrace=False)
