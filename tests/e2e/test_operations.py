"""Operations on the standalone cluster: savepoint, stop with savepoint, rescale 1 -> 2 -> 1 and
resume, while traffic keeps coming; the committed transitions are exactly those of one
uninterrupted run (none lost, none twice) and Redis holds the memberships they imply."""

from __future__ import annotations

import subprocess
import sys

import pytest
from confluent_kafka import Producer

from infra.stack import create_topics
from jobs.committed_log import read_topic
from jobs.operations import FlinkRest
from jobs.redis_view import RedisSegmentView
from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from tests.e2e.conftest import job_environment, wait_until
from udfs.events import UserEvent
from udfs.profile_config import DAY_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.transitions import replay_events

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

PARTITIONS = 2
# A source subtask reading both partitions may run ahead on one of them: a lag longer than the
# traffic keeps every event ahead of the watermark at parallelism 1 too.
WATERMARK_LAG_MS = 12 * 3600_000


@pytest.mark.parametrize("flink_cluster", [2], indirect=True, ids=["two single-slot TaskManagers"])
def test_savepoint_rescale_one_two_one_and_resume_lose_and_repeat_nothing(
    broker, redis_url, flink_cluster, stack_root, catalog
):
    topics = {"events": "ops-events", "transitions": "ops-transitions", "dlq": "ops-dlq"}
    create_topics(broker, {topics["events"]: PARTITIONS, topics["transitions"]: PARTITIONS, topics["dlq"]: 1})
    traffic = list(generate_events(40, seed=9, start_ms=START_MS, duration_ms=10 * 3600_000))
    last = traffic[-1].timestamp
    sentinels = [
        UserEvent(f"sentinel-{p}-1", f"sentinel-{p}", "page_view", last + 2 * DAY_MS) for p in range(PARTITIONS)
    ]
    codec = catalog.codec("UserEvent")
    producer = Producer({"bootstrap.servers": broker, "enable.idempotence": True})

    def produce(events, partition=None):
        for e in events:
            kw = {} if partition is None else {"partition": partition}
            producer.produce(topics["events"], key=e.user_id.encode(), value=codec.encode(e.to_record()), **kw)
        assert producer.flush(30) == 0

    settings = dict(
        bootstrap_servers=broker,
        redis_url=redis_url,
        parallelism=1,
        checkpoint_interval_ms=1000,
        watermark_lag_ms=WATERMARK_LAG_MS,
        events_topic=topics["events"],
        transitions_topic=topics["transitions"],
        dead_letter_topic=topics["dlq"],
        transactional_id_prefix="ops",
    )
    env = job_environment(stack_root, "ops", settings)
    env["SEGMENTS_STACK_FLINK_REST_PORT"] = str(flink_cluster.flink_rest)
    rest = FlinkRest(flink_cluster.flink_rest)

    def segments(*argv):
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def committed() -> int:
        return len(read_topic(broker, topics["transitions"]).committed)

    thirds = [
        traffic[: len(traffic) // 3],
        traffic[len(traffic) // 3 : 2 * len(traffic) // 3],
        traffic[2 * len(traffic) // 3 :],
    ]
    produce(thirds[0])
    segments("submit", "--detached")
    first = wait_until(lambda: committed() or None, timeout_s=180, interval_s=2)
    # A savepoint of the running job leaves it running.
    assert "savepoint of segment-users" in segments("savepoint")
    job = rest.running_job("segment-users")

    out = segments("rescale", "2")
    assert "resubmitting at parallelism 2" in out
    assert rest.state(job) == "FINISHED"
    # Scaled out: the two keyed subtasks run in the two TaskManagers, one slot (and interpreter) each.
    rescaled = rest.running_job("segment-users")

    def keyed_subtask_hosts():
        vertex = next(v for v in rest._call(f"/jobs/{rescaled}")["vertices"] if "Segment users" in v["name"])
        hosts = rest._call(f"/jobs/{rescaled}/vertices/{vertex['id']}/taskmanagers")["taskmanagers"]
        return len({h["taskmanager-id"] for h in hosts}) == 2 or None

    wait_until(keyed_subtask_hosts, timeout_s=60, interval_s=1)
    produce(thirds[1])
    wait_until(lambda: committed() > first or None, timeout_s=180, interval_s=2)
    # The rest of the traffic while a subtask reads each partition, consumed in full before the
    # rescale back to 1: one subtask reading both partitions could otherwise take one partition's
    # sentinel before the other's tail and make that tail late (docs/limits.md).
    produce(thirds[2])
    segmentation = Segmentation.load(SHIPPED_DEFINITIONS)
    event_caused, _ = replay_events(segmentation.engine(), traffic)  # the watermark is still before the traffic
    wait_until(lambda: committed() >= len(event_caused) or None, timeout_s=180, interval_s=2)

    out = segments("rescale", "1")
    assert "resubmitting at parallelism 1" in out
    for p, sentinel in enumerate(sentinels):
        produce([sentinel], partition=p)

    expected, profiles = replay_events(
        segmentation.engine(), traffic + sentinels, until_ms=last + 2 * DAY_MS - WATERMARK_LAG_MS - 1
    )
    transitions = catalog.codec("SegmentTransition")

    def all_committed():
        records = read_topic(broker, topics["transitions"]).committed
        return records if len(records) >= len(expected) else None

    records = wait_until(all_committed, timeout_s=300, interval_s=3)
    got = sorted(
        (t["transition_id"], t["user_id"], t["segment"], t["kind"], t["sequence"], t["event_time"])
        for t in (transitions.decode(r.value) for r in records)
    )
    want = sorted((t.transition_id, t.user_id, t.segment, t.kind, t.sequence, t.event_time) for t in expected)
    assert len({g[0] for g in got}) == len(got), "a transition was committed twice"
    assert got == want

    # Redis: written by the job's sink once the checkpoint that committed the transitions to Kafka
    # has completed, in no fixed order with the Kafka commit: waited for, not timed.
    view = RedisSegmentView(redis_url, "seg", retention_ms=0)
    wanted = {
        user_id: {seg: (m.sequence, m.since_ms) for seg, m in profile.memberships.items() if m.member}
        for user_id, profile in profiles.items()
    }

    def redis_differences() -> list[str]:
        return [
            f"{u}: Redis {view.segments_of(u)}, the core {w}" for u, w in wanted.items() if view.segments_of(u) != w
        ]

    wait_until(
        lambda: not redis_differences(),
        timeout_s=60,
        interval_s=0.5,
        on_timeout=lambda: "\n".join(redis_differences()[:10]),
    )
