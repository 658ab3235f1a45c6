"""Shared fixtures for the data tests: the small hand-written files in tests/fixtures/data."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"


@pytest.fixture
def fixture_path():
    """``fixture_path("belle.json")`` -> the absolute path of a fixture file, as a string."""
    return lambda name: str(FIXTURES / name)
