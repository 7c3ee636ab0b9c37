"""Finding the checkpoint to resume from after a lost job or cluster."""

from __future__ import annotations

import os

import pytest

from jobs.operations import OperationError, latest_retained_checkpoint


def make_checkpoint(root, job: str, n: int, mtime_ns: int, complete: bool = True):
    chk = root / job / f"chk-{n}"
    chk.mkdir(parents=True)
    (chk / "some-state").write_bytes(b"x")
    if complete:
        (chk / "_metadata").write_bytes(b"m")
        os.utime(chk / "_metadata", ns=(mtime_ns, mtime_ns))
    return chk


def test_the_newest_complete_checkpoint_of_any_job_is_chosen(tmp_path):
    make_checkpoint(tmp_path, "job-a", 7, 1_000)
    newest = make_checkpoint(tmp_path, "job-b", 3, 3_000)
    make_checkpoint(tmp_path, "job-a", 8, 2_000)
    make_checkpoint(tmp_path, "job-b", 4, 4_000, complete=False)  # being written: no _metadata yet
    (tmp_path / "job-b" / "shared").mkdir()
    assert latest_retained_checkpoint(tmp_path) == newest
    assert latest_retained_checkpoint(tmp_path.as_uri()) == newest


def test_no_checkpoint_and_remote_stores(tmp_path):
    assert latest_retained_checkpoint(tmp_path) is None
    with pytest.raises(OperationError, match="s3://"):
        latest_retained_checkpoint("s3://bucket/checkpoints")
