"""Shared fixtures: codecs, and the generated traffic tests replay."""

from __future__ import annotations

import pytest

from udfs.codec import SchemaCatalog

START_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture(scope="session")
def catalog() -> SchemaCatalog:
    return SchemaCatalog()
