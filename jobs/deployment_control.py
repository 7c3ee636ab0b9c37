"""`segments deploy`, `promote`, `rollback`, `deployments` and `shadow-report`: control records
(udfs/deployments.py, schemas/deployment.avsc) written to the control topic, and what the job
wrote back to its status and shadow topics, read read_committed (docs/deployments.md). The job
validates and applies the records; this only produces and reads them."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from jobs.committed_log import committed_records
from jobs.privacy_requests import deliver_one
from jobs.settings import JobSettings
from udfs.codec import DecodeError, SchemaCatalog
from udfs.deployments import (
    ControlRecord,
    SegmentAgreement,
    deploy_control,
    shadow_agreement,
)

SOURCE = "segments-cli"


def now_ms() -> int:
    """Wall-clock time, ms."""
    return time.time_ns() // 1_000_000


def deploy_record(
    definitions: str | Path, models_dir: str | Path | None, shadow: bool, at_ms: int | None
) -> ControlRecord:
    """The DEPLOY record `segments deploy` sends: a new id, the instant `at_ms` (default: now,
    wall clock, which live event time follows)."""
    requested = now_ms()
    at = requested if at_ms is None else at_ms
    return deploy_control(str(uuid.uuid4()), definitions, at, shadow, models_dir, requested, SOURCE)


def action_record(action: str, at_ms: int | None) -> ControlRecord:
    """A PROMOTE or ROLLBACK record (instant as for `deploy_record`)."""
    requested = now_ms()
    return ControlRecord(
        str(uuid.uuid4()), action, requested if at_ms is None else at_ms, requested_at=requested, source=SOURCE
    )


def produce_control(settings: JobSettings, control: ControlRecord) -> None:
    """Writes the record to the control topic (idempotent producer, waits for the broker's
    acknowledgement)."""
    if not settings.control_topic:
        raise ValueError("control_topic is not set: the job reads no deployments (docs/deployments.md)")
    value = SchemaCatalog().codec("Deployment").encode(control.to_record())
    # Models travel inline: a record may be large.
    errors = deliver_one(
        settings, settings.control_topic, control.deployment_id.encode(), value, {"message.max.bytes": 64 << 20}
    )
    if errors:
        raise RuntimeError(f"deployment {control.deployment_id} not delivered: {errors}")


def write_control(path: Path, control: ControlRecord) -> None:
    """Appends the record to a deployments file (`segments backtest --deployments`)."""
    with path.open("a") as out:
        out.write(json.dumps(control.to_json()) + "\n")


def read_records(settings: JobSettings, topic: str, record_name: str) -> list[dict]:
    """Every committed record of the topic, decoded (undecodable ones left out)."""
    codec = SchemaCatalog().codec(record_name)
    out = []
    for record in committed_records(settings.bootstrap_servers, topic, security=settings.kafka_security()):
        try:
            out.append(codec.decode(record.value))
        except DecodeError:
            continue
    return out


def shadow_report(settings: JobSettings, start_ms: int, end_ms: int) -> dict[str, SegmentAgreement]:
    """The agreement per segment of the committed transitions and shadow transitions over
    event time [start_ms, end_ms)."""
    active = read_records(settings, settings.transitions_topic, "SegmentTransition")
    shadow = read_records(settings, settings.shadow_topic, "SegmentTransition")
    return shadow_agreement(active, shadow, start_ms, end_ms)
