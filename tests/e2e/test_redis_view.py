"""The Redis view against a real redis-server: the rebuild's writer (one round trip per batch,
ordered by sequence, still correct after Redis forgot the apply script), and the job's sink, which
writes a transition only once the checkpoint that holds it has completed."""

from __future__ import annotations

import re

import pytest

from jobs.redis_view import RedisSegmentView

pytestmark = pytest.mark.e2e


def test_newer_sequences_apply_and_older_ones_are_ignored(redis_url):
    view = RedisSegmentView(redis_url, "t", retention_ms=0)
    assert view.apply([("u1", "vip", "ENTER", 1, 100), ("u1", "cart", "ENTER", 1, 100)]) == 2
    assert view.apply([("u1", "vip", "EXIT", 2, 200), ("u1", "vip", "ENTER", 1, 100)]) == 1
    assert view.segments_of("u1") == {"cart": (1, 100)}
    assert view.members("vip") == set() and view.members("cart") == {"u1"}


def test_a_batch_sent_after_the_script_was_flushed_is_applied_once(redis_url):
    view = RedisSegmentView(redis_url, "t", retention_ms=0)
    view.apply([("u1", "vip", "ENTER", 1, 100)])
    view.client.script_flush()
    assert view.apply([("u1", "vip", "EXIT", 2, 200), ("u2", "vip", "ENTER", 1, 150)]) == 2
    assert view.members("vip") == {"u2"}
    assert view.client.hget("t:seq:u1", "vip") == b"2"


def test_each_batch_sends_only_its_evalshas(redis_url):
    view = RedisSegmentView(redis_url, "t", retention_ms=0)
    view.apply([("u0", "vip", "ENTER", 1, 100)])

    def calls() -> dict[str, int]:
        stats = view.client.info("commandstats")
        return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval", "script")}

    before = calls()
    view.apply([(f"u{i}", "vip", "ENTER", 1, 100) for i in range(1, 6)])
    after = calls()
    # No SCRIPT EXISTS / LOAD and no EVAL of the body per write: five EVALSHAs, one pipeline.
    assert {name: after[name] - before[name] for name in after} == {"evalsha": 5, "eval": 0, "script": 0}
    assert view.members("vip") == {f"u{i}" for i in range(6)}


@pytest.mark.cluster
def test_a_transition_reaches_redis_only_after_its_checkpoint_completes(
    broker, redis_url, submit_job, flink_cluster, stack_root, catalog
):
    """The real job, broker and Redis: a transition the job has made and written into its open Kafka
    transaction is not in Redis while no checkpoint after it has completed, and is there once one
    has. Periodic checkpoints are 10 minutes apart; the one that counts is triggered over REST.

    No timing is assumed: the JobManager logs "Completed checkpoint N" before it tells any task to
    commit (CheckpointCoordinator.cleanupAfterCompletedCheckpoint, Flink 2.0), so if its log shows
    no checkpoint completed between sending the event and reading Redis, no commit of that
    transition can have run. An attempt during which the interval's first periodic checkpoint (at
    a random instant) completed proves nothing, and the next user is tried."""
    from confluent_kafka import Producer

    from infra.stack import create_topics
    from jobs.committed_log import LogRecord, read_partition, split_by_outcome
    from jobs.operations import FlinkRest
    from jobs.settings import SHIPPED_DEFINITIONS
    from tests.conftest import START_MS
    from tests.e2e.conftest import wait_until
    from udfs.events import UserEvent
    from udfs.segmentation import Segmentation
    from udfs.transitions import replay_events

    topics = {"events": "probe-events", "transitions": "probe-transitions", "dlq": "probe-dlq"}
    create_topics(broker, {topics["events"]: 1, topics["transitions"]: 1, topics["dlq"]: 1})
    submit_job(
        bootstrap_servers=broker,
        redis_url=redis_url,
        parallelism=1,
        checkpoint_interval_ms=600_000,
        transaction_timeout_ms=900_000,
        events_topic=topics["events"],
        transitions_topic=topics["transitions"],
        dead_letter_topic=topics["dlq"],
        transactional_id_prefix="probe",
    )
    rest = FlinkRest(flink_cluster.flink_rest)
    job_id = wait_until(lambda: _running_job(rest), timeout_s=120, interval_s=0.5)
    codec = catalog.codec("UserEvent")
    producer = Producer({"bootstrap.servers": broker, "enable.idempotence": True})
    view = RedisSegmentView(redis_url, "seg", retention_ms=0)
    engine_of = Segmentation.load(SHIPPED_DEFINITIONS).engine

    def completed_checkpoints() -> set[int]:
        logs = (stack_root / "logs").glob("flink-*standalonesession*.log")
        text = "".join(p.read_text(errors="replace") for p in logs)
        return {int(n) for n in re.findall(rf"Completed checkpoint (\d+) for job {job_id}", text)}

    def in_the_log(user: str) -> str | None:
        """'open' while the user's transitions are only in an open transaction, 'committed' after."""
        entries = read_partition(broker, topics["transitions"], 0)
        if not any(isinstance(e, LogRecord) and e.key == user.encode() for e in entries):
            return None
        committed, _ = split_by_outcome(entries)
        return "committed" if any(r.key == user.encode() for r in committed) else "open"

    probes: list[UserEvent] = []
    for attempt in range(6):
        event = UserEvent(
            f"probe-{attempt}-1",
            f"probe-{attempt}",
            "add_to_cart",
            START_MS + attempt * 60_000,
            product_id="p1",
            category="shoes",
            price=10.0,
            quantity=1,
        )
        before = completed_checkpoints()
        producer.produce(topics["events"], key=event.user_id.encode(), value=codec.encode(event.to_record()))
        assert producer.flush(30) == 0
        probes.append(event)
        state = wait_until(lambda user=event.user_id: in_the_log(user), timeout_s=180, interval_s=0.2)
        in_redis = view.segments_of(event.user_id)
        if state == "open" and completed_checkpoints() == before:
            assert in_redis == {}, f"Redis holds {in_redis} of a transaction not yet committed"
            break
    else:
        pytest.fail("a periodic checkpoint completed during every attempt: nothing was shown")

    trigger = rest._call(f"/jobs/{job_id}/checkpoints", {})["request-id"]

    def checkpointed():
        status = rest._call(f"/jobs/{job_id}/checkpoints/{trigger}")
        return status if status["status"]["id"] == "COMPLETED" else None

    status = wait_until(checkpointed, timeout_s=120, interval_s=0.5)
    assert "failure-cause" not in status.get("operation", {}), status
    _, profiles = replay_events(engine_of(), probes)
    for user_id, profile in profiles.items():
        current = {seg: (m.sequence, m.since_ms) for seg, m in profile.memberships.items() if m.member}
        assert current, user_id
        # Waiting for the commit that follows the completed checkpoint, not for a time.
        wait_until(
            lambda u=user_id, c=current: view.segments_of(u) == c,
            timeout_s=60,
            interval_s=0.2,
            on_timeout=lambda u=user_id, c=current: f"{u}: Redis {view.segments_of(u)}, the core {c}",
        )
        assert in_the_log(user_id) == "committed"


def _running_job(rest) -> str | None:
    try:
        return rest.running_job()
    except Exception:  # noqa: BLE001 (not up yet)
        return None
