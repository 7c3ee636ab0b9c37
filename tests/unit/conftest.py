"""Unit-tier fixtures: a small set of models trained once per session (about 25 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.train import TrainingReport, train

# The clv_30d model's history: 100 users x 100 days (the default length) of seed 3.
CLV_USERS = 100


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> tuple[Path, TrainingReport]:
    out = tmp_path_factory.mktemp("models")
    return out, train(out, users=150, days=36, seed=3, clv_users=CLV_USERS)
