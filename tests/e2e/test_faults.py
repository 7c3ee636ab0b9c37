"""Fault injection on the standalone cluster: the job keeps its promises while its parts fail.

Seeded traffic (unique event ids, each user's events in order on one partition, resent duplicates,
events out of order within the watermark lag, bad records) arrives in chunks; between chunks the
TaskManager is killed with SIGKILL three times, the job is stopped with a savepoint and resumed, the
broker is paused (SIGSTOP) for 30 s, Redis is killed and restarted empty. The expected transitions
come from the engine-free core over the same events. After the run, the invariants of
tests/e2e/invariants.py must hold; a second test breaks the configuration (no restart strategy)
and shows invariant 1 failing, so the checker can fail.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from confluent_kafka import Producer

from infra.stack import ManagedProcess, create_topics, start_redis, start_taskmanager, taskmanager_pids
from jobs.committed_log import read_topic
from jobs.operations import FlinkRest
from jobs.redis_view import RedisSegmentView
from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from tests.e2e.conftest import job_environment, wait_until
from tests.e2e.invariants import (
    Committed,
    dead_letter_differences,
    differences_from_fault_free,
    missing_transitions,
    redis_differences,
    repeated_or_out_of_sequence,
)
from udfs.codec import MAGIC
from udfs.events import UserEvent
from udfs.profile_config import DAY_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.transitions import replay_events

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.faults]

PARTITIONS = 2
# Events out of order by less than the lag are never behind the watermark, so where a timer fires
# relative to them cannot depend on how fast each partition is read: the outcome is deterministic.
WATERMARK_LAG_MS = 5 * 60_000
OUT_OF_ORDER_MAX_MS = 2 * 60_000
MAX_EVENT_BYTES = 4096
BROKER_PAUSE_S = 30
PACED_EVENTS_PER_S = 100
# The traffic's seed: FAULT_SUITE_SEED=N runs the same faults over other traffic (not a SEGMENTS_
# variable: those are the job's settings).
SEED = int(os.environ.get("FAULT_SUITE_SEED", "21"))


class Traffic:
    """The seeded events in production order, the bad records, and what the core expects."""

    def __init__(self, users: int, seed: int):
        rng = random.Random(seed)
        generated = list(generate_events(users, seed=seed, start_ms=START_MS, duration_ms=12 * 3600_000))
        by_user: dict[str, list[UserEvent]] = {}
        for e in generated:
            by_user.setdefault(e.user_id, []).append(e)
        # Out of order: some consecutive events of a user swapped, when less than
        # OUT_OF_ORDER_MAX_MS apart. Done per user; the merged order below keeps each user's order.
        self.swapped = 0
        for events in by_user.values():
            for i in range(len(events) - 1):
                a, b = events[i], events[i + 1]
                if b.timestamp - a.timestamp < OUT_OF_ORDER_MAX_MS and rng.random() < 0.15:
                    events[i], events[i + 1] = b, a
                    self.swapped += 1
        # Production order: by time, but each user's events in their (partly swapped) order.
        cursors = dict.fromkeys(by_user, 0)
        ordered = []
        for e in generated:
            events = by_user[e.user_id]
            ordered.append(events[cursors[e.user_id]])
            cursors[e.user_id] += 1
        # Duplicates, as a producer's retries: every add_to_cart and purchase resent at once, and
        # some other events resent two of the user's events later when that is within
        # OUT_OF_ORDER_MAX_MS (a retry hours later would be a too-late event, dead-lettered or,
        # right after a restart when no watermark is known yet, accepted: not a deterministic run).
        self.events: list[UserEvent] = []
        pending: dict[str, list[tuple[int, UserEvent]]] = {}
        seen_of_user: dict[str, int] = {}
        self.resent = 0
        for e in ordered:
            self.events.append(e)
            n = seen_of_user[e.user_id] = seen_of_user.get(e.user_id, 0) + 1
            for copy in [
                copy
                for due, copy in pending.get(e.user_id, [])
                if due == n and e.timestamp - copy.timestamp < OUT_OF_ORDER_MAX_MS
            ]:
                self.events.append(copy)
                self.resent += 1
            if e.event_type in ("add_to_cart", "purchase"):
                self.events.append(e)
                self.resent += 1
            elif rng.random() < 0.03:
                pending.setdefault(e.user_id, []).append((n + 2, e))
        last = max(e.timestamp for e in generated)
        # One event per partition a day later: every partition's watermark passes all pending timers.
        self.sentinels = [
            UserEvent(f"sentinel-{p}-1", f"sentinel-{p}", "page_view", last + DAY_MS) for p in range(PARTITIONS)
        ]
        # And once more after the last fault: watermarks are not checkpointed, so a job restored
        # after reading the first sentinels starts again from no watermark, fires no timer and
        # judges no event late until new events come.
        self.last_sentinels = [
            UserEvent(f"sentinel-{p}-2", f"last-sentinel-{p}", "page_view", last + DAY_MS + 60_000)
            for p in range(PARTITIONS)
        ]
        self.final_watermark = last + DAY_MS + 60_000 - WATERMARK_LAG_MS - 1
        self.distinct = len(generated)


def bad_records(codec, examples: list[UserEvent]) -> dict[str, bytes]:
    valid = codec.encode(examples[0].to_record())
    return {
        "bad_magic": b"definitely not avro",
        "unknown_schema": MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + valid[10:],
        "missing_user_id": codec.encode(replace(examples[1], user_id="").to_record()),
        "oversize": codec.encode(replace(examples[2], properties={"blob": "x" * (MAX_EVENT_BYTES + 10)}).to_record()),
        "invalid_field": codec.encode(replace(examples[3], price=math.nan).to_record()),
    }


class FaultRun:
    """The topics, the job's settings and the handles to every real part the faults hit."""

    def __init__(self, broker, redis_url, flink_cluster, stack_root, catalog, name: str, **settings):
        self.broker, self.redis_url, self.stack_root, self.catalog = broker, redis_url, stack_root, catalog
        self.topics = {"events": f"{name}-events", "transitions": f"{name}-transitions", "dlq": f"{name}-dlq"}
        create_topics(
            broker, {self.topics["events"]: PARTITIONS, self.topics["transitions"]: PARTITIONS, self.topics["dlq"]: 1}
        )
        self.codec = catalog.codec("UserEvent")
        self.producer = Producer({"bootstrap.servers": broker, "enable.idempotence": True})
        self.env = job_environment(
            stack_root,
            name,
            dict(
                bootstrap_servers=broker,
                redis_url=redis_url,
                parallelism=PARTITIONS,
                checkpoint_interval_ms=1000,
                watermark_lag_ms=WATERMARK_LAG_MS,
                max_event_bytes=MAX_EVENT_BYTES,
                events_topic=self.topics["events"],
                transitions_topic=self.topics["transitions"],
                dead_letter_topic=self.topics["dlq"],
                transactional_id_prefix=name,
                restart_max_backoff_ms=2000,
                **settings,
            ),
        )
        self.env["SEGMENTS_STACK_FLINK_REST_PORT"] = str(flink_cluster.flink_rest)
        self.rest = FlinkRest(flink_cluster.flink_rest)
        self.faults: list[str] = []

    def segments(self, *argv) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv], env=self.env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def produce_events(self, events, partition=None) -> None:
        for e in events:
            kw = {} if partition is None else {"partition": partition}
            self.producer.produce(
                self.topics["events"], key=e.user_id.encode(), value=self.codec.encode(e.to_record()), **kw
            )
        assert self.producer.flush(60) == 0

    def produce_paced(self, events, per_s: float) -> None:
        """The events in batches of 10, `per_s` a second (a producer thread of its own)."""
        started = time.monotonic()
        for i in range(0, len(events), 10):
            time.sleep(max(0.0, started + i / per_s - time.monotonic()))
            self.produce_events(events[i : i + 10])

    def produce_raw(self, payloads, partition: int) -> None:
        for payload in payloads:
            self.producer.produce(self.topics["events"], value=payload, partition=partition)
        assert self.producer.flush(60) == 0

    def committed(self) -> list[Committed]:
        """The transitions topic as read_committed must show it: through our own reader, since
        the local broker shows aborted transactions to read_committed clients (see
        jobs/committed_log.py)."""
        codec = self.catalog.codec("SegmentTransition")
        return [
            Committed(r.partition, r.offset, codec.decode(r.value))
            for r in read_topic(self.broker, self.topics["transitions"]).committed
        ]

    def wait_for_progress(self, beyond: int, timeout_s: float = 240) -> int:
        return wait_until(
            lambda: (n := len(self.committed())) > beyond and n,
            timeout_s=timeout_s,
            interval_s=2,
            on_timeout=self.cluster_log,
        )

    def cluster_log(self) -> str:
        logs = sorted((self.stack_root / "logs").glob("flink-*.log"))
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in logs[-2:])

    # --- faults ---------------------------------------------------------------------------------

    def kill_taskmanager(self) -> None:
        pids = taskmanager_pids(self.stack_root)
        assert pids, "no TaskManager to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not taskmanager_pids(self.stack_root), timeout_s=30, interval_s=0.2)
        start_taskmanager(self.stack_root)
        self.faults.append("TaskManager killed (SIGKILL) and replaced")

    def stop_with_savepoint_and_resume(self) -> None:
        location = self.segments("stop", "--savepoint").strip().rsplit(" ", 1)[1]
        self.segments("resume", "--from", location)
        self.faults.append("stopped with a savepoint and resumed from it")

    def cancel_and_resume_from_the_latest_checkpoint(self) -> None:
        """As after losing the job without a savepoint: only retained checkpoints are left."""
        assert "cancelled" in self.segments("stop")
        self.segments("resume", "--from-latest-checkpoint")
        self.faults.append("cancelled and resumed from the latest retained checkpoint")

    def pause_broker(self, seconds: float) -> None:
        broker = ManagedProcess("broker", self.stack_root)
        os.kill(broker.pid(), signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(broker.pid(), signal.SIGCONT)
        self.faults.append(f"broker paused (SIGSTOP) for {seconds:.0f} s")

    def restart_redis_empty(self, down_s: float) -> None:
        redis = ManagedProcess("redis", self.stack_root)
        pid = redis.pid()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # our child (the fixture started it): reap it, or it lingers as a zombie
        time.sleep(down_s)
        start_redis(self.stack_root, int(self.redis_url.rsplit(":", 1)[1].split("/")[0]))
        self.faults.append(f"Redis killed (SIGKILL), down {down_s:.0f} s, restarted empty")


def test_faults_lose_nothing_repeat_nothing_and_redis_converges(
    broker, redis_url, flink_cluster, stack_root, catalog, request
):
    traffic = Traffic(users=300, seed=SEED)
    run = FaultRun(broker, redis_url, flink_cluster, stack_root, catalog, "faults")
    # The view follower, as its own process beside the cluster (as the compose file and the
    # Kubernetes manifest run it): it must bring Redis back after its empty restart by itself.
    follower = ManagedProcess("follower", stack_root)
    follower.start([sys.executable, "-m", "jobs.cli", "redis", "follow"], env=run.env)
    request.addfinalizer(follower.stop)
    bad = bad_records(run.codec, traffic.events)
    chunks = [traffic.events[i * len(traffic.events) // 6 : (i + 1) * len(traffic.events) // 6] for i in range(6)]
    segmentation = Segmentation.load(SHIPPED_DEFINITIONS)
    expected, profiles = replay_events(
        segmentation.engine(),
        traffic.events + traffic.sentinels + traffic.last_sentinels,
        until_ms=traffic.final_watermark,
    )
    assert traffic.swapped > 20 and traffic.resent > 300 and len(expected) > 1000

    sent: list[UserEvent] = []

    def send(events):
        run.produce_events(events)
        sent.extend(events)

    def caught_up():
        """Everything the core derives from the events sent so far is committed (the job may have
        committed more: timers of the watermark beyond each user's last event)."""
        so_far = {t.transition_id for t in replay_events(segmentation.engine(), sent)[0]}

        def committed_count():
            got = run.committed()
            return so_far <= {c.transition_id for c in got} and len(got)

        return wait_until(committed_count, timeout_s=300, interval_s=2, on_timeout=run.cluster_log)

    send(chunks[0])
    run.segments("submit", "--detached")
    run.wait_for_progress(0)
    run.kill_taskmanager()  # 1: while the first chunk is being worked through
    seen = caught_up()

    # The second chunk arrives over ~6 s while the TaskManager is killed, so the kill finds the job
    # working: transitions in an open Kafka transaction (and, for the Redis sink, in its writer)
    # that the restored job must drop and make again. A chunk sent at once would be worked through
    # and committed before the first commit the test waits for, and the kill would find nothing.
    sender = threading.Thread(target=run.produce_paced, args=(chunks[1], PACED_EVENTS_PER_S))
    sender.start()
    run.wait_for_progress(seen)
    run.kill_taskmanager()  # 2: mid-chunk
    sender.join()
    sent.extend(chunks[1])
    caught_up()

    send(chunks[2][: len(chunks[2]) // 2])
    run.produce_raw(bad.values(), partition=0)
    send(chunks[2][len(chunks[2]) // 2 :])
    caught_up()
    run.stop_with_savepoint_and_resume()

    send(chunks[3])
    time.sleep(1)
    run.pause_broker(BROKER_PAUSE_S)
    seen = caught_up()

    send(chunks[4])
    time.sleep(1)
    run.restart_redis_empty(down_s=5)
    run.wait_for_progress(seen)
    run.cancel_and_resume_from_the_latest_checkpoint()
    seen = caught_up()

    send(chunks[5])
    for p, sentinel in enumerate(traffic.sentinels):
        run.produce_events([sentinel], partition=p)
    run.wait_for_progress(seen)
    run.kill_taskmanager()  # 3: during the last chunk
    for p, sentinel in enumerate(traffic.last_sentinels):
        run.produce_events([sentinel], partition=p)

    wait_until(lambda: len(run.committed()) >= len(expected), timeout_s=300, interval_s=3, on_timeout=run.cluster_log)
    # Redis lost everything before its restart; no command is run: the follower found its offsets
    # gone and replays the committed log into it while the job keeps writing (both apply only
    # newer sequences).
    assert follower.running(), follower.log_file.read_text(errors="replace")[-3000:]

    # Too-late events, once the watermark is a day past the traffic (no fault after this point:
    # a restore starts the watermark afresh). Every expected transition is committed, so the last
    # sentinels were processed and their watermark emitted (every 200 ms) a checkpoint ago.
    late = [replace(e, event_id=f"late-{i}") for i, e in enumerate(traffic.events[10:13])]
    run.produce_events(late)
    injected = [(reason, payload[:MAX_EVENT_BYTES]) for reason, payload in bad.items()]
    injected += [("late", run.codec.encode(e.to_record())) for e in late]
    dlq_codec = catalog.codec("DeadLetter")

    def dead_letters():
        letters = [dlq_codec.decode(r.value) for r in read_topic(broker, run.topics["dlq"]).committed]
        return letters if len(letters) >= len(injected) else None

    letters = wait_until(dead_letters, timeout_s=120, interval_s=2, on_timeout=run.cluster_log)
    view = RedisSegmentView(redis_url, "seg", retention_ms=0)
    names = segmentation.definitions.names
    # The job's Redis sink commits when a checkpoint completes, as the Kafka sink does, but in no
    # fixed order with it: wait until the view has caught up with the log (it converges; one that
    # has not after two minutes is reported by invariant 4 below).
    deadline = time.monotonic() + 120
    while redis_differences(run.committed(), view, names) and time.monotonic() < deadline:
        time.sleep(2)
    committed = run.committed()  # again: nothing may have come since, the late events changed nothing
    valid_payloads = {run.codec.encode(e.to_record()) for e in traffic.events}
    problems = {
        "1 missing": missing_transitions(expected, committed),
        "2 repeated or out of sequence": repeated_or_out_of_sequence(committed),
        "3 differs from a fault-free run": differences_from_fault_free(expected, committed),
        "4 Redis differs from the committed log": redis_differences(committed, view, names),
        "5 dead letters": dead_letter_differences(injected, letters, valid_payloads),
    }
    aborted = len(read_topic(broker, run.topics["transitions"]).aborted)
    print(
        f"\nfault run (seed {SEED}): {len(traffic.events) + len(bad) + len(late) + 2 * PARTITIONS} records "
        f"({traffic.distinct} distinct events, {traffic.resent} resent, {traffic.swapped} swapped out of order, "
        f"{len(bad)} bad, {len(late)} too late); faults: {'; '.join(run.faults)}; "
        f"{len(committed)} committed transitions checked against {len(expected)} expected: "
        f"lost {len(problems['1 missing'])}, duplicated "
        f"{len(committed) - len({c.transition_id for c in committed})}; {aborted} transitions in aborted "
        f"transactions (replays after the kills, hidden from read_committed)"
    )
    failing = {k: v[:8] for k, v in problems.items() if v}
    assert not failing, "\n".join(f"invariant {k}:\n  " + "\n  ".join(v) for k, v in failing.items())
    follower_log = follower.log_file.read_text(errors="replace")
    follower.stop()
    assert "replaying faults-transitions from its beginning" in follower_log, follower_log[-3000:]
    assert len(run.faults) == 7
    # Every user of the core's replay is in Redis as the core has them (invariant 4 compared Redis
    # with the log; this ties the log back to the core's final memberships too).
    for user_id, profile in profiles.items():
        current = {seg: (m.sequence, m.since_ms) for seg, m in profile.memberships.items() if m.member}
        assert view.segments_of(user_id) == current, user_id


def test_negative_control_without_a_restart_strategy_a_killed_taskmanager_loses_transitions(
    broker, redis_url, flink_cluster, stack_root, catalog
):
    """The checker can fail: the same kind of run with `restart_strategy: none` (a deliberately
    broken configuration) dies at the first killed TaskManager, and invariant 1 reports the
    transitions that never reached the committed topic."""
    traffic = Traffic(users=120, seed=22)
    run = FaultRun(broker, redis_url, flink_cluster, stack_root, catalog, "broken", restart_strategy="none")
    expected, _ = replay_events(
        Segmentation.load(SHIPPED_DEFINITIONS).engine(),
        traffic.events + traffic.sentinels + traffic.last_sentinels,
        until_ms=traffic.final_watermark,
    )
    half = len(traffic.events) // 2
    run.produce_events(traffic.events[:half])
    run.segments("submit", "--detached")
    run.wait_for_progress(0)
    run.kill_taskmanager()
    job = wait_until(
        lambda: next((j["jid"] for j in run.rest._call("/jobs/overview")["jobs"] if j["state"] == "FAILED"), None),
        timeout_s=120,
        interval_s=1,
    )
    run.produce_events(traffic.events[half:])
    for p, sentinel in enumerate(traffic.sentinels + traffic.last_sentinels):
        run.produce_events([sentinel], partition=p % PARTITIONS)
    time.sleep(3)
    assert run.rest.state(job) == "FAILED"
    missing = missing_transitions(expected, run.committed())
    assert len(missing) > len(expected) // 3, f"{len(missing)} of {len(expected)} missing"
