"""Unit-tier fixtures: a small set of models trained once per session (about 15 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.train import TrainingReport, train


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> tuple[Path, TrainingReport]:
    out = tmp_path_factory.mktemp("models")
    return out, train(out, users=150, days=36, seed=3)
