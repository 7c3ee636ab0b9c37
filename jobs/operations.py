"""Savepoints, stop-with-savepoint and the running job's identity, through Flink's REST API (the
same calls the web UI and `flink savepoint` / `flink stop` make). `resume` and `rescale` are a
submission from a savepoint (`segments submit --from-savepoint`, with a new parallelism)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse


class OperationError(RuntimeError):
    pass


class FlinkRest:
    def __init__(self, rest_port: int, host: str = "127.0.0.1"):
        self.base = f"http://{host}:{rest_port}"

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except OSError as err:
            raise OperationError(f"{self.base}{path}: {err}") from None

    def running_job(self, name: str | None = None) -> str:
        """The id of the one running job (of that name, if given)."""
        jobs = [
            j
            for j in self._call("/jobs/overview")["jobs"]
            if j["state"] == "RUNNING" and (name is None or j["name"] == name)
        ]
        if len(jobs) != 1:
            raise OperationError(f"expected one running job{f' named {name!r}' if name else ''}, found {len(jobs)}")
        return jobs[0]["jid"]

    def state(self, job_id: str) -> str:
        return self._call(f"/jobs/{job_id}")["state"]

    def savepoint(self, job_id: str, directory: str | None = None, timeout_s: float = 300) -> str:
        """Triggers a savepoint and returns its location once complete; the job keeps running."""
        body = {"cancel-job": False, "formatType": "CANONICAL"}
        if directory:
            body["target-directory"] = directory
        trigger = self._call(f"/jobs/{job_id}/savepoints", body)["request-id"]
        return self._await(f"/jobs/{job_id}/savepoints/{trigger}", timeout_s)

    def stop_with_savepoint(self, job_id: str, directory: str | None = None, timeout_s: float = 300) -> str:
        """Stops the job after a final savepoint (sources stop, sinks commit) and returns its
        location; the job ends FINISHED."""
        body = {"drain": False, "formatType": "CANONICAL"}
        if directory:
            body["targetDirectory"] = directory
        trigger = self._call(f"/jobs/{job_id}/stop", body)["request-id"]
        location = self._await(f"/jobs/{job_id}/savepoints/{trigger}", timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.state(job_id) not in ("FINISHED", "CANCELED", "FAILED"):
            if time.monotonic() > deadline:
                raise OperationError(f"job {job_id} did not stop within {timeout_s:.0f} s")
            time.sleep(0.5)
        return location

    def cancel(self, job_id: str, timeout_s: float = 120) -> None:
        """Cancels the job (no savepoint; its retained checkpoints stay for a resume)."""
        request = urllib.request.Request(f"{self.base}/jobs/{job_id}?mode=cancel", method="PATCH")
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except OSError as err:
            raise OperationError(f"cancel {job_id}: {err}") from None
        deadline = time.monotonic() + timeout_s
        while self.state(job_id) not in ("CANCELED", "FAILED", "FINISHED"):
            if time.monotonic() > deadline:
                raise OperationError(f"job {job_id} did not stop within {timeout_s:.0f} s")
            time.sleep(0.5)

    def _await(self, path: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self._call(path)
            if status["status"]["id"] == "COMPLETED":
                operation = status.get("operation", {})
                if "failure-cause" in operation:
                    cause = operation["failure-cause"].get("stack-trace", "").splitlines()
                    raise OperationError(f"savepoint failed: {cause[0] if cause else operation['failure-cause']}")
                return operation["location"]
            if time.monotonic() > deadline:
                raise OperationError(f"savepoint not complete within {timeout_s:.0f} s")
            time.sleep(0.5)


def latest_retained_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under a job's checkpoint directory (Flink's layout:
    `<dir>/<job id>/chk-<n>/_metadata`, `_metadata` written last), for resuming after the job or
    the whole cluster was lost. Local (file://) directories only."""
    text = str(checkpoint_dir)
    if "://" in text:
        parsed = urlparse(text)
        if parsed.scheme != "file":
            raise OperationError(
                f"cannot list {parsed.scheme}:// checkpoints here: pass --from-savepoint with the "
                "chk-<n> directory (Flink's web UI and REST API show the latest)"
            )
        text = parsed.path
    newest = max(Path(text).glob("*/chk-*/_metadata"), key=lambda m: m.stat().st_mtime_ns, default=None)
    return None if newest is None else newest.parent
