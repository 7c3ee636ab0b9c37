"""The engine-free core (udfs/) type-checks under mypy with the settings of pyproject.toml
([tool.mypy]: check_untyped_defs, the stub-less libraries ignored), run through mypy's API with
the venv's pinned mypy."""

from __future__ import annotations

from pathlib import Path

from mypy import api

REPO = Path(__file__).resolve().parents[2]


def test_udfs_type_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # mypy reads pyproject.toml and resolves `udfs` from the working directory
    # A fresh cache per run (under pytest's temporary directory), so that nothing is written into the
    # repository; the check of udfs/ takes a few seconds from cold.
    stdout, stderr, status = api.run(
        ["--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(tmp_path / "mypy-cache"), "udfs"]
    )
    assert status == 0, f"mypy found errors in udfs/:\n{stdout}\n{stderr}"
