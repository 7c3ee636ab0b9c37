"""The Redis view's follower (jobs/redis_follower.py) against a real broker and a real
redis-server: it applies committed transitions only (aborted and open transactions never reach
the view), keeps its place in Redis, waits out a Redis outage and catches up, and replays the
topic by itself when Redis comes back empty. Expected views are worked out from the transitions
the test produced, not from the follower."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Producer

from infra.stack import create_topics, free_port, start_redis
from jobs.redis_follower import ViewFollower, follow, offsets_key
from jobs.redis_view import RedisSegmentView
from jobs.settings import load_settings
from tests.e2e.conftest import wait_until
from udfs.profile_config import DAY_MS, HOUR_MS

pytestmark = pytest.mark.e2e

TOPIC = "follow-transitions"


def record(codec, user: str, segment: str, kind: str, sequence: int, at: int) -> bytes:
    return codec.encode(
        {
            "transition_id": f"{user}-{segment}-{sequence}",
            "user_id": user,
            "segment": segment,
            "kind": kind,
            "event_time": at,
            "emitted_at": at,
            "cause": "EVENT",
            "cause_event_id": None,
            "sequence": sequence,
            "definitions_version": "v1",
            "model_version": None,
            "reason": {"rule": "r", "features": {}, "scores": {}, "labels": {}, "missing": []},
        }
    )


class Transitions:
    """A transactional producer of transitions, as the job's Kafka sink writes them."""

    def __init__(self, broker: str, codec, transactional_id: str, topic: str = TOPIC):
        self.codec, self.topic = codec, topic
        self.producer = Producer({"bootstrap.servers": broker, "transactional.id": transactional_id})
        self.producer.init_transactions(30)

    def send(self, transitions, commit: bool = True) -> None:
        self.producer.begin_transaction()
        for user, segment, kind, sequence, at in transitions:
            self.producer.produce(self.topic, record(self.codec, user, segment, kind, sequence, at), key=user.encode())
        self.producer.flush(30)
        if commit:
            self.producer.commit_transaction(30)
        else:
            self.producer.abort_transaction(30)


class FlinkLogs:
    """What the embedded MiniCluster's Java side logged since this object was made: PyFlink's
    local mode writes it under pyflink/log (one file per user and host, rewritten by each JVM),
    each line starting with its local time to the second."""

    def __init__(self):
        import pyflink

        self.directory = Path(pyflink.__file__).parent / "log"
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    def since_start(self) -> str:
        lines = []
        for path in sorted(self.directory.glob("flink-*-python-*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if line[:19] >= self.started or (lines and not line[:4].isdigit()):  # and continuations
                    lines.append(line)
        return "\n".join(lines)


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = [line for line in r.read().decode().splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines)}


def test_the_follower_applies_committed_transitions_waits_out_redis_and_replays_into_an_empty_one(
    broker, stack_root, catalog
):
    codec = catalog.codec("SegmentTransition")
    create_topics(broker, {TOPIC: 2})
    port = free_port()
    redis = start_redis(stack_root, port)
    url = f"redis://127.0.0.1:{port}/0"
    settings = load_settings(environ={}, bootstrap_servers=broker, redis_url=url, transitions_topic=TOPIC)
    view = RedisSegmentView(url, settings.redis_key_prefix, 0)
    job = Transitions(broker, codec, "follow-job")
    job.send([("a", "vip", "ENTER", 1, 100), ("b", "vip", "ENTER", 1, 100), ("a", "cart", "ENTER", 1, 110)])
    job.send([("a", "vip", "EXIT", 2, 200), ("c", "vip", "ENTER", 1, 210)], commit=False)  # aborted: never shown
    # A transaction left open (its producer gone): not applied, and the follower's resume offset
    # stays before it.
    orphan = Transitions(broker, codec, "follow-orphan")
    orphan.producer.begin_transaction()
    orphan.producer.produce(TOPIC, record(codec, "d", "vip", "ENTER", 1, 300), key=b"d")
    orphan.producer.flush(30)

    stop = threading.Event()
    metrics_port = free_port()
    runner = threading.Thread(target=follow, args=(settings, stop, metrics_port), daemon=True)
    runner.start()
    try:
        wait_until(
            lambda: view.members("vip") == {"a", "b"} and view.members("cart") == {"a"},
            timeout_s=60,
            interval_s=0.2,
            on_timeout=lambda: f"vip {view.members('vip')} cart {view.members('cart')}",
        )
        assert view.segments_of("a") == {"vip": (1, 100), "cart": (1, 110)}
        stored = {int(p): int(o) for p, o in view.client.hgetall(offsets_key("seg")).items()}
        assert set(stored) == {0, 1}
        wait_until(
            lambda: metrics(metrics_port).get("segments_redis_view_applied_total") == 3,
            timeout_s=30,
            interval_s=0.2,
            on_timeout=lambda: str(metrics(metrics_port)),
        )

        # Redis down while the job goes on committing: the follower waits, says so, and catches up.
        redis.stop()
        wait_until(
            lambda: metrics(metrics_port)["segments_redis_view_redis_unavailable"] == 1, timeout_s=30, interval_s=0.2
        )
        job.send([("a", "vip", "EXIT", 2, 400), ("e", "vip", "ENTER", 1, 410)])
        job.send([("b", "vip", "EXIT", 2, 420)])
        redis = start_redis(stack_root, port)  # empty: the managed redis-server keeps nothing on disk
        view = RedisSegmentView(url, settings.redis_key_prefix, 0)
        # Everything committed, from the beginning of the topic: the view rebuilt by itself.
        wait_until(
            lambda: view.members("vip") == {"e"} and view.members("cart") == {"a"},
            timeout_s=60,
            interval_s=0.2,
            on_timeout=lambda: f"vip {view.members('vip')} cart {view.members('cart')}",
        )
        assert view.segments_of("a") == {"cart": (1, 110)} and view.segments_of("b") == {}
        figures = metrics(metrics_port)
        assert figures["segments_redis_view_redis_unavailable"] == 0
        assert figures["segments_redis_view_replays_total"] == 1

        # The open transaction, committed at last: applied, and the lag goes to zero.
        orphan.producer.commit_transaction(30)
        wait_until(lambda: "d" in view.members("vip"), timeout_s=60, interval_s=0.2)

        def caught_up():
            figures = metrics(metrics_port)
            return all(v == 0 for k, v in figures.items() if k.startswith("segments_redis_view_lag_records"))

        wait_until(caught_up, timeout_s=30, interval_s=0.2, on_timeout=lambda: str(metrics(metrics_port)))
        stop.set()
        runner.join(timeout=30)
        assert not runner.is_alive()

        # A follower started afresh resumes at the stored offsets: it reads nothing already applied.
        again = ViewFollower(RedisSegmentView(url, settings.redis_key_prefix, 0), broker, TOPIC)
        while again.step():
            pass
        assert again.figures.read == 0
    finally:
        stop.set()
        redis.stop()


def test_the_job_keeps_committing_while_redis_is_down_for_a_minute_and_the_view_catches_up_by_itself(
    broker, stack_root, run_job, catalog
):
    """Issue 19: the real job (`segments run`, which runs the follower beside it) under traffic;
    Redis killed for 60 s: the Kafka transitions go on committing meanwhile (the job never waits
    for Redis, nor restarts), and once Redis is back, empty, the view equals a replay of the
    committed log without any command. The committed log itself is the core's output exactly."""
    from confluent_kafka import Producer as EventProducer

    from jobs.committed_log import read_topic
    from jobs.settings import SHIPPED_DEFINITIONS
    from tests.conftest import START_MS
    from tests.e2e.invariants import Committed, redis_differences
    from udfs.events import UserEvent
    from udfs.segmentation import Segmentation
    from udfs.shoppers import generate_events
    from udfs.transitions import replay_events

    topics = {"events": "down-events", "transitions": "down-transitions", "dlq": "down-dlq"}
    create_topics(broker, dict.fromkeys(topics.values(), 1))
    port = free_port()
    redis = start_redis(stack_root, port)
    url = f"redis://127.0.0.1:{port}/0"
    lag_ms = 2_000
    traffic = list(generate_events(40, seed=9, start_ms=START_MS, duration_ms=6 * HOUR_MS))
    sentinel = UserEvent("sentinel-1", "sentinel", "page_view", traffic[-1].timestamp + DAY_MS)
    chunks = [
        traffic[: len(traffic) // 3],
        traffic[len(traffic) // 3 : 2 * len(traffic) // 3],
        traffic[2 * len(traffic) // 3 :] + [sentinel],
    ]
    codec = catalog.codec("UserEvent")
    producer = EventProducer({"bootstrap.servers": broker, "enable.idempotence": True})

    def send(events) -> None:
        for e in events:
            producer.produce(topics["events"], key=e.user_id.encode(), value=codec.encode(e.to_record()))
        assert producer.flush(30) == 0

    transitions = catalog.codec("SegmentTransition")

    def committed() -> list[Committed]:
        return [
            Committed(r.partition, r.offset, transitions.decode(r.value))
            for r in read_topic(broker, topics["transitions"]).committed
        ]

    flink_logs = FlinkLogs()
    job = run_job(
        "down-job",
        bootstrap_servers=broker,
        redis_url=url,
        parallelism=1,
        checkpoint_interval_ms=1000,
        redis_retry_ms=2000,
        watermark_lag_ms=lag_ms,
        events_topic=topics["events"],
        transitions_topic=topics["transitions"],
        dead_letter_topic=topics["dlq"],
        transactional_id_prefix="down",
    )
    engine = Segmentation.load(SHIPPED_DEFINITIONS).engine()
    names = engine.definitions.names
    send(chunks[0])
    first = wait_until(lambda: job.assert_alive() or committed(), timeout_s=240, interval_s=2, on_timeout=job.log_tail)
    view = RedisSegmentView(url, "seg", 0)
    wait_until(
        lambda: not redis_differences(committed(), view, names),
        timeout_s=60,
        interval_s=1,
        on_timeout=lambda: "\n".join(redis_differences(committed(), view, names)[:5]),
    )

    redis.stop()
    down_at = time.monotonic()
    send(chunks[1])
    # Committing goes on while Redis is down: the transitions of the second chunk reach Kafka.
    during = wait_until(
        lambda: job.assert_alive() or (len(c := committed()) > len(first) and c),
        timeout_s=50,
        interval_s=1,
        on_timeout=job.log_tail,
    )
    assert time.monotonic() - down_at < 60, "the job's transitions waited for Redis"
    time.sleep(max(0.0, 60 - (time.monotonic() - down_at)))
    job.assert_alive()
    redis = start_redis(stack_root, port)  # back after a minute, empty
    try:
        send(chunks[2])
        final_watermark = sentinel.timestamp - lag_ms - 1
        expected, _ = replay_events(engine, traffic + [sentinel], until_ms=final_watermark)
        log = wait_until(
            lambda: job.assert_alive() or (len(c := committed()) >= len(expected) and c),
            timeout_s=240,
            interval_s=2,
            on_timeout=job.log_tail,
        )
        key = ("user_id", "segment", "kind", "sequence", "event_time", "cause", "cause_event_id", "transition_id")
        assert sorted(tuple(c.record[k] for k in key) for c in log) == sorted(
            (t.user_id, t.segment, t.kind, t.sequence, t.event_time, t.cause, t.cause_event_id, t.transition_id)
            for t in expected
        )
        assert len(during) > len(first)
        view = RedisSegmentView(url, "seg", 0)
        wait_until(
            lambda: not redis_differences(log, view, names),
            timeout_s=120,
            interval_s=1,
            on_timeout=lambda: "\n".join(redis_differences(log, view, names)[:5]) + "\n" + job.log_tail(),
        )
        text = job.proc.log_file.read_text(errors="replace")
        assert "Redis unavailable" in text and "replaying down-transitions from its beginning" in text
        # The sink gave its commits to the follower, and the job never restarted (before, it
        # failed over after redis_retry_ms, and again at every retry until Redis came back).
        flink = flink_logs.since_start()
        assert "are left to the view follower until Redis answers again" in flink
        assert "Redis at redis://127.0.0.1:" in flink and "is reachable again" in flink
        assert "RESTARTING" not in flink, "the job restarted while Redis was down"
    finally:
        redis.stop()


def test_a_step_that_fails_midway_never_stores_an_offset_past_a_transition_it_did_not_apply(broker, redis_url, catalog):
    """The review's case: one fetch of more than a batch, and Redis failing after the first
    batch, or refusing one transition (a key of the wrong type): the stored offsets stay before
    what was not applied, so the next start applies it."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    from jobs import redis_follower

    codec = catalog.codec("SegmentTransition")
    topic = "midway-transitions"
    create_topics(broker, {topic: 1})
    job = Transitions(broker, codec, "midway-job", topic)
    users = [f"u{i:04d}" for i in range(2500)]
    job.producer.begin_transaction()
    for user in users:
        job.producer.produce(topic, record(codec, user, "vip", "ENTER", 1, 100), key=user.encode())
    job.producer.commit_transaction(30)
    view = RedisSegmentView(redis_url, "seg", 0)

    follower = ViewFollower(view, broker, topic)
    applied_batches = []
    real_apply = follower._apply

    def apply_then_fail(batch, offsets):
        if applied_batches:
            raise RedisConnectionError("Redis went away after the first batch")
        real_apply(batch, offsets)
        applied_batches.append(len(batch))

    follower._apply = apply_then_fail
    with pytest.raises(RedisConnectionError):
        while follower.step():
            pass
    assert applied_batches == [redis_follower.BATCH]
    assert len(view.members("vip")) == redis_follower.BATCH
    # A fresh follower resumes from what Redis says and applies the rest.
    again = ViewFollower(view, broker, topic)
    while again.step():
        pass
    assert view.members("vip") == set(users)

    # A transition Redis refuses: the script stops before the offsets, which do not pass it.
    view.client.set("seg:seq:poison", "not a hash")
    job.send([("early", "vip", "ENTER", 1, 200), ("poison", "vip", "ENTER", 1, 200), ("late", "vip", "ENTER", 1, 200)])
    stored = view.client.hgetall(offsets_key("seg"))
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        while again.step():
            pass
    assert view.client.hgetall(offsets_key("seg")) == stored
    view.client.delete("seg:seq:poison")
    fixed = ViewFollower(view, broker, topic)
    while fixed.step():
        pass
    assert {"early", "poison", "late"} <= view.members("vip")
