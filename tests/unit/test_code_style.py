"""The code base is formatted by `ruff format` and clean under `ruff check`, with the rules and
settings of pyproject.toml ([tool.ruff]), run by the venv's own pinned ruff so that the result does
not depend on a ruff found elsewhere on the machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    # `python -m ruff` finds the binary installed next to this interpreter (the venv's, from the lock).
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("format", "--check", "--diff", "."),
        ("check", "--no-cache", "--output-format", "full", "."),
    ],
    ids=["ruff-format", "ruff-check"],
)
def test_ruff_passes_on_the_repository(args):
    result = ruff(*args)
    assert result.returncode == 0, f"ruff {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
