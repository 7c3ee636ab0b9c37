"""Issue 17's commands against a real broker (tansu), without the job (tests/e2e/test_live_deployments.py
runs it): `segments deploy`, `promote` and `rollback`
write control records that decode to what was asked; the validation operator's logic
(jobs/deployment_stream.py) decides them from the topic; `segments deployments` reads its status
records back; `segments shadow-report` summarizes the transitions and shadow topics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from confluent_kafka import Producer

from infra.stack import ManagedProcess, create_topics
from jobs.cli import main as cli_main
from jobs.committed_log import committed_records
from jobs.deployment_stream import ControlValidator
from jobs.settings import load_settings
from tests.conftest import START_MS
from tests.e2e.conftest import job_environment, wait_until
from tests.unit.basic_definitions import basic_yaml
from udfs.codec import SchemaCatalog
from udfs.deployments import control_from_record
from udfs.profile_config import HOUR_MS
from udfs.segmentation import Segmentation
from udfs.transitions import Transition

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

TOPICS = {"control": 1, "deployment-status": 1, "transitions": 2, "shadow": 2}


@pytest.fixture
def settings_env(broker, monkeypatch):
    create_topics(broker, TOPICS)
    for name, value in {
        "BOOTSTRAP_SERVERS": broker,
        "CONTROL_TOPIC": "control",
        "DEPLOYMENT_STATUS_TOPIC": "deployment-status",
        "TRANSITIONS_TOPIC": "transitions",
        "SHADOW_TOPIC": "shadow",
        "REDIS_URL": "",
    }.items():
        monkeypatch.setenv(f"SEGMENTS_{name}", value)
    return load_settings()


def test_deploy_promote_rollback_reach_the_control_topic_and_deployments_reads_the_verdicts(
    settings_env, tmp_path, capsys
):
    v2 = tmp_path / "v2.yaml"
    v2.write_text(basic_yaml(active_window="5m").replace("basic-1", "v2"))
    v3 = tmp_path / "v3.yaml"
    v3.write_text(basic_yaml(abandon_after="10m").replace("basic-1", "v3"))
    assert cli_main(["deploy", str(v2), "--at", str(START_MS + HOUR_MS)]) == 0
    assert cli_main(["deploy", str(v3), "--shadow", "--at", str(START_MS + 2 * HOUR_MS)]) == 0
    assert cli_main(["promote", "--at", str(START_MS + 3 * HOUR_MS)]) == 0
    assert cli_main(["rollback", "--at", str(START_MS + 2 * HOUR_MS)]) == 0  # before the promote: refused
    capsys.readouterr()

    records = list(committed_records(settings_env.bootstrap_servers, "control"))
    codec = SchemaCatalog().codec("Deployment")
    controls = [control_from_record(codec.decode(r.value)) for r in records]  # the CLI stamps the instant
    assert [(c.action, c.mode, c.definitions_version) for c in controls] == [
        ("DEPLOY", "ACTIVE", "v2"),
        ("DEPLOY", "SHADOW", "v3"),
        ("PROMOTE", None, None),
        ("ROLLBACK", None, None),
    ]
    assert [r.key.decode() for r in records] == [c.deployment_id for c in controls]

    # What the job's validation operator writes for them, to the status topic.
    validator = ControlValidator(
        Segmentation.from_text(basic_yaml().encode(), "basic.yaml"), SchemaCatalog(), None, None
    )
    status_out = Producer({"bootstrap.servers": settings_env.bootstrap_servers})
    for r in records:
        verdict = validator.verdict(r.value, 0, 0)
        status_out.produce("deployment-status", key=verdict.deployment_id.encode(), value=verdict.status)
    assert status_out.flush(30) == 0

    assert cli_main(["deployments"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["active: v3 from 2023-11-15T01:13:20.000Z", "shadow: none"]
    # By instant: the rollback (2 h, refused: before the promote's 3 h) before the promote.
    assert [line.split()[1] for line in out[2:]] == ["ACCEPTED", "ACCEPTED", "REFUSED", "ACCEPTED"]
    assert "before the latest deployment" in out[4]


def test_a_broken_file_is_refused_before_it_reaches_the_topic(settings_env, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: v9\nsegments:\n  - name: x\n    when: no_such_feature > 1\n")
    assert cli_main(["deploy", str(broken)]) == 1
    assert "no_such_feature" in capsys.readouterr().err
    assert list(committed_records(settings_env.bootstrap_servers, "control")) == []


def test_shadow_report_compares_the_two_topics_over_a_window(settings_env, capsys):
    codec = SchemaCatalog().codec("SegmentTransition")

    def transition(user: str, kind: str, at: int, sequence: int, version: str) -> bytes:
        t = Transition(user, "active_browser", kind, at, "EVENT", "e", sequence, version, None, "r", {})
        return codec.encode(t.to_record(0))

    out = Producer({"bootstrap.servers": settings_env.bootstrap_servers})
    for user in ("a", "b"):
        out.produce("transitions", key=user.encode(), value=transition(user, "ENTER", START_MS, 1, "v1"))
    out.produce("shadow", key=b"a", value=transition("a", "ENTER", START_MS, 1, "v2"))
    out.produce("shadow", key=b"c", value=transition("c", "ENTER", START_MS, 1, "v2"))
    out.produce("shadow", key=b"c", value=transition("c", "EXIT", START_MS + 1, 2, "v2"))
    out.produce("shadow", key=b"c", value=transition("c", "ENTER", START_MS + 2, 3, "v2"))
    assert out.flush(30) == 0
    assert cli_main(["shadow-report", "--start", str(START_MS), "--end", str(START_MS + HOUR_MS)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == [
        "active_browser",
        "1",
        "1",
        "1",
        "33.3%",
        "0.0%",
        "33.3%",
    ]  # c re-entered: 1 of 3 entries


def test_the_jobs_control_path_decides_each_record_once_and_commits_the_statuses(settings_env, stack_root, tmp_path):
    """The control topic's source, the validation operator and the status topic's exactly-once
    sink (jobs/deployment_operator.attach_control) as a MiniCluster job against the broker: a
    deployment sent by `segments deploy`, one without effective_at (the Kafka timestamp is its
    instant), a broken one, and an unreadable record."""
    from udfs.deployments import ACTIVE, DEPLOY, ControlRecord

    v2 = tmp_path / "v2.yaml"
    v2.write_text(basic_yaml(active_window="5m").replace("basic-1", "v2"))
    assert cli_main(["deploy", str(v2), "--at", str(START_MS + HOUR_MS)]) == 0
    codec = SchemaCatalog().codec("Deployment")
    v3 = basic_yaml(abandon_after="10m").replace("basic-1", "v3")
    stampless = ControlRecord("no-instant", DEPLOY, 0, ACTIVE, v3.encode(), "v3").to_record()
    stampless["effective_at"] = None
    broken = ControlRecord("broken", DEPLOY, START_MS, ACTIVE, b"version: v9\nsegments: [", None)
    out = Producer({"bootstrap.servers": settings_env.bootstrap_servers})
    record_time = START_MS + 5 * HOUR_MS
    out.produce("control", key=b"no-instant", value=codec.encode(stampless), timestamp=record_time)
    out.produce("control", key=b"broken", value=codec.encode(broken.to_record()))
    out.produce("control", key=b"garbage", value=b"not a control record")
    assert out.flush(30) == 0
    create_topics(settings_env.bootstrap_servers, {settings_env.dead_letter_topic: 1})
    definitions = tmp_path / "basic.yaml"
    definitions.write_text(basic_yaml())
    job = ManagedProcess("control-path", stack_root)
    job.start(
        [sys.executable, "-m", "tests.e2e.control_path_job"],
        env=job_environment(
            stack_root,
            "control-path",
            {
                "bootstrap_servers": settings_env.bootstrap_servers,
                "control_topic": "control",
                "deployment_status_topic": "deployment-status",
                "definitions_path": str(definitions),
                "redis_url": "",
                "checkpoint_interval_ms": 1000,
                "restart_strategy": "none",  # a failure ends the process, and the test with its log
            },
        ),
        cwd=REPO,
    )
    status_codec = SchemaCatalog().codec("DeploymentStatus")
    try:

        def statuses():
            assert job.running(), job.log_tail(60)
            found = list(committed_records(settings_env.bootstrap_servers, settings_env.deployment_status_topic))
            return [status_codec.decode(r.value) for r in found] if len(found) >= 3 else None

        decided = wait_until(statuses, 300, on_timeout=job.log_tail)
        dead_topic = settings_env.dead_letter_topic
        dead = wait_until(lambda: list(committed_records(settings_env.bootstrap_servers, dead_topic)), 300)
    finally:
        job.stop()
    assert [(s["status"], s["effective_at"], s["active_version"]) for s in decided] == [
        ("ACCEPTED", START_MS + HOUR_MS, "v2"),
        ("ACCEPTED", record_time, "v3"),
        ("REFUSED", START_MS, None),
    ]
    assert [SchemaCatalog().codec("DeadLetter").decode(r.value)["reason"] for r in dead] == ["bad_magic"]
