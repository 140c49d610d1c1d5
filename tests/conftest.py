"""Fixtures shared by the test files; the helpers they use are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    d = tmp_path / "failpoints"
    d.mkdir()
    return d
