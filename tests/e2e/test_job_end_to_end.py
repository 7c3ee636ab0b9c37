"""Avro events through a real broker, the real job, and back: transitions under read_committed,
the Redis view, and the dead-letter topic."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import avro.io
import avro.schema
import pytest
from confluent_kafka import Producer

from infra.stack import create_topics
from jobs.backtest import read_events, run_backtest
from jobs.committed_log import read_topic
from jobs.redis_view import RedisSegmentView, rebuild_from_topic
from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from tests.e2e.conftest import SubmittedJob, wait_until
from udfs.codec import MAGIC, SCHEMAS_DIR
from udfs.events import UserEvent
from udfs.profile_config import DAY_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.transitions import replay_events

pytestmark = pytest.mark.e2e

PARTITIONS = 2
WATERMARK_LAG_MS = 2_000
MAX_EVENT_BYTES = 4096


def apache_reader(name: str) -> avro.io.DatumReader:
    return avro.io.DatumReader(avro.schema.parse((SCHEMAS_DIR / name).read_text()))


def apache_decode(reader: avro.io.DatumReader, payload: bytes) -> dict:
    assert payload[:2] == MAGIC
    return reader.read(avro.io.BinaryDecoder(io.BytesIO(payload[10:])))


def millis(value) -> int:
    # Apache avro returns timestamp-millis as an aware datetime
    return round(value.timestamp() * 1000)


def sentinels(last_ms: int) -> list[tuple[int, UserEvent]]:
    """One event per partition a day after the traffic: moves every partition's watermark past all
    the traffic's pending timers, so the expected output is exact."""
    return [
        (p, UserEvent(f"sentinel-{p}-1", f"sentinel-{p}", "page_view", last_ms + DAY_MS)) for p in range(PARTITIONS)
    ]


def test_job_turns_kafka_events_into_committed_transitions_redis_memberships_and_dead_letters(
    broker, redis_url, run_job, catalog
):
    check_job_end_to_end(broker, redis_url, run_job, catalog)


@pytest.mark.cluster
def test_job_submitted_to_the_standalone_cluster_produces_the_same_transitions(broker, redis_url, submit_job, catalog):
    check_job_end_to_end(broker, redis_url, submit_job, catalog)


def check_job_end_to_end(broker, redis_url, start_job, catalog):
    topics = {"events": "shopper-events", "transitions": "segment-transitions", "dlq": "segment-dead-letters"}
    create_topics(broker, {topics["events"]: PARTITIONS, topics["transitions"]: PARTITIONS, topics["dlq"]: 1})
    generated = list(generate_events(60, seed=5, start_ms=START_MS, duration_ms=10 * 3600_000))
    # A producer's resends: every add_to_cart and purchase sent twice (same event id, same key, so
    # the copy follows the original on its partition). The job must count each once.
    traffic = [copy for e in generated for copy in ([e, e] if e.event_type in ("add_to_cart", "purchase") else [e])]
    codec = catalog.codec("UserEvent")
    producer = Producer({"bootstrap.servers": broker, "enable.idempotence": True})

    # Bad records go to partition 0 in the middle of the traffic: the job must route each to the
    # dead-letter topic and keep every valid event around them.
    valid_example = codec.encode(traffic[0].to_record())
    bad_records = {
        "bad_magic": b"definitely not avro",
        "unknown_schema": MAGIC + b"\x01\x02\x03\x04\x05\x06\x07\x08" + valid_example[10:],
        "missing_user_id": codec.encode(replace(traffic[1], user_id="").to_record()),
        "oversize": codec.encode(replace(traffic[2], properties={"blob": "x" * (MAX_EVENT_BYTES + 10)}).to_record()),
        "invalid_field": codec.encode(replace(traffic[3], price=math.nan).to_record()),
    }
    half = len(traffic) // 2
    for event in traffic[:half]:
        producer.produce(topics["events"], key=event.user_id.encode(), value=codec.encode(event.to_record()))
    for payload in bad_records.values():
        producer.produce(topics["events"], value=payload, partition=0)
    for event in traffic[half:]:
        producer.produce(topics["events"], key=event.user_id.encode(), value=codec.encode(event.to_record()))
    for partition, event in sentinels(traffic[-1].timestamp):
        producer.produce(
            topics["events"], key=event.user_id.encode(), value=codec.encode(event.to_record()), partition=partition
        )
    assert producer.flush(30) == 0

    job = start_job(
        bootstrap_servers=broker,
        redis_url=redis_url,
        parallelism=PARTITIONS,
        checkpoint_interval_ms=2000,
        watermark_lag_ms=WATERMARK_LAG_MS,
        max_event_bytes=MAX_EVENT_BYTES,
        events_topic=topics["events"],
        transitions_topic=topics["transitions"],
        dead_letter_topic=topics["dlq"],
        transactional_id_prefix="e2e",
        # Redis from the job's sink alone here, and the rebuild below counts what it applies:
        # the view follower (tests/e2e/test_redis_follower.py) would race it for the same writes.
        redis_follower=False,
    )

    # What the job must emit: the core over each partition's order (the producer keeps a user on
    # one partition, so per-user order is the traffic's order), up to the final watermark.
    all_events = traffic + [e for _, e in sentinels(traffic[-1].timestamp)]
    final_watermark = traffic[-1].timestamp + DAY_MS - WATERMARK_LAG_MS - 1
    segmentation = Segmentation.load(SHIPPED_DEFINITIONS)
    engine = segmentation.engine()
    expected, profiles = replay_events(engine, all_events, until_ms=final_watermark)
    assert len(expected) > 150
    # Had the resends counted (their ids made unique), the transitions would differ.
    seen: set[str] = set()
    counted_twice = [
        replace(e, event_id=e.event_id + "-resent") if e.event_id in seen or seen.add(e.event_id) else e
        for e in all_events
    ]
    naive, _ = replay_events(segmentation.engine(), counted_twice, until_ms=final_watermark)
    assert sorted(map(str, naive)) != sorted(map(str, expected))

    reader = apache_reader("segment_transition.avsc")

    def committed_transitions():
        job.assert_alive()
        records = read_topic(broker, topics["transitions"]).committed
        return records if len(records) >= len(expected) else None

    records = wait_until(committed_transitions, timeout_s=240, interval_s=3, on_timeout=job.log_tail)
    decoded = [(r.key, apache_decode(reader, r.value)) for r in records]
    assert all(key.decode() == t["user_id"] for key, t in decoded), "records are keyed by user id"
    got = sorted(
        (
            t["user_id"],
            t["segment"],
            t["kind"],
            t["sequence"],
            millis(t["event_time"]),
            t["cause"],
            t["cause_event_id"],
            t["transition_id"],
            t["reason"]["rule"],
        )
        for _, t in decoded
    )
    want = sorted(
        (t.user_id, t.segment, t.kind, t.sequence, t.event_time, t.cause, t.cause_event_id, t.transition_id, t.rule)
        for t in expected
    )
    assert got == want

    # `segments backtest` over the events topic (a Kafka range), with no cluster, agrees with the
    # committed transitions, and sets apart the same bad records the job dead-lettered.
    log = read_events(f"kafka://{broker}/{topics['events']}", max_event_bytes=MAX_EVENT_BYTES)
    result = run_backtest(segmentation, log, watermark_lag_ms=WATERMARK_LAG_MS)
    assert result.until_ms == final_watermark
    assert dict(result.rejected) == dict.fromkeys(bad_records, 1)
    backtested = sorted(
        (t.user_id, t.segment, t.kind, t.sequence, t.event_time, t.cause, t.cause_event_id, t.transition_id, t.rule)
        for t in result.transitions
    )
    assert backtested == got

    # Redis holds exactly the memberships the transitions imply (once the job's Redis sink has
    # committed the checkpoint that committed the last of them to Kafka: waited for, not timed) ...
    view = RedisSegmentView(redis_url, "seg", retention_ms=0)

    def redis_differences_from_the_core() -> list[str]:
        problems = []
        for user_id, profile in profiles.items():
            current = {seg: (m.sequence, m.since_ms) for seg, m in profile.memberships.items() if m.member}
            if view.segments_of(user_id) != current:
                problems.append(f"{user_id}: Redis {view.segments_of(user_id)}, the core {current}")
        for segment in engine.definitions.names:
            members = {u for u, p in profiles.items() if p.memberships.get(segment) and p.memberships[segment].member}
            if view.members(segment) != members:
                problems.append(f"members of {segment}: Redis {len(view.members(segment))}, the core {len(members)}")
        return problems

    wait_until(
        lambda: not redis_differences_from_the_core(),
        timeout_s=60,
        interval_s=0.5,
        on_timeout=lambda: "\n".join(redis_differences_from_the_core()[:10]) + "\n" + job.log_tail(),
    )
    # ... with the rule each current segment was entered by (the sink's Java writer carries it) ...
    entered_by = {(t.user_id, t.segment): t.rule for t in expected if t.kind == "ENTER"}

    def rules_in_redis() -> dict[tuple[str, str], str]:
        return {(u, c.segment): c.rule for u in profiles for c in view.current_segments(u)}

    assert rules_in_redis() == {key: entered_by[key] for key in rules_in_redis()} and rules_in_redis()
    # ... and `segments redis rebuild --flush` brings an emptied view back to the same state; a
    # second rebuild over it applies nothing (every sequence is already there).
    sink_rules = rules_in_redis()
    assert view.clear() > 0 and view.members("active_browser") == set()
    rebuilt = rebuild_from_topic(view, broker, topics["transitions"], open_wait_s=0)
    assert (rebuilt.read, rebuilt.applied, rebuilt.aborted) == (len(expected), len(expected), 0)
    assert redis_differences_from_the_core() == [] and rules_in_redis() == sink_rules
    again = rebuild_from_topic(view, broker, topics["transitions"], open_wait_s=0)
    assert (again.read, again.applied) == (len(expected), 0)

    # A too-late event, sent once the watermark is known to be a day ahead, is a dead letter too.
    late = replace(traffic[5], event_id="late-1")
    producer.produce(topics["events"], key=late.user_id.encode(), value=codec.encode(late.to_record()))
    assert producer.flush(30) == 0
    dlq_reader = apache_reader("dead_letter.avsc")

    def dead_letters():
        job.assert_alive()
        # The project's own read_committed reader, as the fault suite reads its dead letters:
        # librdkafka's stops at a transaction tansu still holds open (docs/limits.md).
        letters = [apache_decode(dlq_reader, r.value) for r in read_topic(broker, topics["dlq"]).committed]
        return letters if len(letters) >= len(bad_records) + 1 else None

    letters = wait_until(dead_letters, timeout_s=120, interval_s=3, on_timeout=job.log_tail)
    by_reason = {d["reason"]: d for d in letters}
    assert sorted(d["reason"] for d in letters) == sorted([*bad_records, "late"])
    for reason, payload in bad_records.items():
        letter = by_reason[reason]
        assert letter["source_topic"] == topics["events"] and letter["source_partition"] == 0
        if reason == "oversize":
            assert letter["payload"] == payload[:MAX_EVENT_BYTES] and "truncated" in letter["message"]
        else:
            assert letter["payload"] == payload
    assert by_reason["late"]["payload"] == codec.encode(late.to_record())
    # The late event changed nothing: no transition beyond the expected ones was committed.
    assert len(read_topic(broker, topics["transitions"]).committed) == len(expected)

    # On the standalone cluster, the job's metrics over REST agree with what was sent and emitted.
    if isinstance(job, SubmittedJob):

        def total(values: dict, suffix: str) -> float:
            return sum(v for k, v in values.items() if k.endswith(suffix))

        def settled():  # the REST metric fetcher refreshes every few seconds
            values = job_metrics(job.rest_port)
            done = total(values, ".late_events") == 1 and total(values, ".redis_writes") == len(expected)
            return values if done else None

        metrics = wait_until(settled, timeout_s=60, interval_s=3, on_timeout=lambda: str(job_metrics(job.rest_port)))

        def metric(suffix: str) -> float:
            assert any(k.endswith(suffix) for k in metrics), f"no metric ending {suffix!r}: {sorted(metrics)}"
            return total(metrics, suffix)

        assert metric(".events_in") == len(traffic) + len(bad_records) + PARTITIONS + 1
        assert metric(".dead_letters") == len(bad_records)
        assert metric(".late_events") == 1
        assert metric(".duplicate_events") == len(traffic) - len(generated)
        assert metric(".transitions_out") == len(expected)
        for segment, kind in {(t.segment, t.kind) for t in expected}:
            want = sum(1 for t in expected if (t.segment, t.kind) == (segment, kind))
            assert metric(f".segment.{segment}.{kind.lower()}") == want, (segment, kind)
        assert metric(".redis_writes") == len(expected)
        assert metric(".redis_write_latency_p99_us") > 0
        assert metric(".inference_latency_p99_us") > 0
        # The same counters through the Prometheus reporter the cluster is configured with.
        exposition = prometheus_exposition(job.prometheus_port)
        assert prometheus_total(exposition, "flink_taskmanager_job_task_operator_transitions_out") == len(expected)
        active_enter = sum(1 for t in expected if (t.segment, t.kind) == ("active_browser", "ENTER"))
        assert (
            prometheus_total(
                exposition, "flink_taskmanager_job_task_operator_segment_enter", 'segment="active_browser"'
            )
            == active_enter
        )


def prometheus_exposition(first_port: int) -> str:
    """The text of every Prometheus endpoint the cluster's processes opened in their port range."""
    import urllib.request

    from infra.stack import PROMETHEUS_PORTS

    texts = []
    for port in range(first_port, first_port + PROMETHEUS_PORTS):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                texts.append(r.read().decode())
        except OSError:
            continue
    assert texts, f"no Prometheus endpoint in {first_port}..{first_port + PROMETHEUS_PORTS - 1}"
    return "\n".join(texts)


def prometheus_total(exposition: str, name: str, label: str = "") -> float:
    total, found = 0.0, False
    for line in exposition.splitlines():
        if line.startswith(name + "{") and label in line:
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"no {name} {label} in the Prometheus exposition"
    return total


def job_metrics(rest_port: int) -> dict[str, float]:
    """The job's operator metrics, summed over subtasks, by REST id ('<operator>.<metric>')."""
    import json
    import urllib.request

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}{path}", timeout=10) as r:
            return json.load(r)

    job_id = get("/jobs/overview")["jobs"][0]["jid"]
    out: dict[str, float] = {}
    for vertex in get(f"/jobs/{job_id}")["vertices"]:
        base = f"/jobs/{job_id}/vertices/{vertex['id']}/subtasks/metrics"
        names = [m["id"] for m in get(base)]
        wanted = [n for n in names if not n.startswith(("Status", "buffers", "numBytes", "numRecords"))]
        for start in range(0, len(wanted), 20):
            for m in get(f"{base}?get={','.join(wanted[start : start + 20])}&agg=sum"):
                out[m["id"]] = m["sum"]
    return out
