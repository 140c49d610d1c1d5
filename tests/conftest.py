"""Fixtures shared by the test files; the helpers they use are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import spot.run.config  # noqa: F401 - registers the config schema that conf/config.yaml composes first
from tests.helpers import CREDENTIALS


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    d = tmp_path / "failpoints"
    d.mkdir()
    return d


@pytest.fixture
def credentials(monkeypatch):
    """The moto S3 server's credentials in the environment (the S3 test files use it for every
    test: `pytestmark = pytest.mark.usefixtures("credentials")`)."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
