"""The downstream consumer's guide (docs/consumers.md) against a real broker and a real
redis-server: its example consumer (docs/examples/transitions_consumer.py, run as its own process,
as a user would) acts on each committed transition exactly once, though it reads some records
twice (an aborted attempt and its committed replay, which tansu delivers to read_committed
clients; a re-run from the beginning), and resumes from the offsets it committed; the guide's
Redis lookups (docs/examples/segment_lookups.py) read the view `segments redis rebuild` writes.

The transitions are the core's over generated traffic, encoded by the project's codec and written
in transactions keyed by user, as the job's Kafka sink writes them. Expectations are worked out
from those records, not from the consumer."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from confluent_kafka import Producer

from infra.stack import create_topics
from jobs.backtest import EventLog, run_backtest, transition_records
from jobs.redis_view import RedisSegmentView, rebuild_from_topic
from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from udfs.profile_config import HOUR_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = PROJECT_ROOT / "docs" / "examples"
TOPIC = "guide-transitions"


def core_transitions(users: int, hours: int) -> list[dict]:
    segmentation = Segmentation.load(SHIPPED_DEFINITIONS)
    events = list(generate_events(users, 5, START_MS, hours * HOUR_MS))
    return transition_records(run_backtest(segmentation, EventLog("generated", events)).transitions)


def write(producer: Producer, codec, records: list[dict], commit: bool) -> None:
    producer.begin_transaction()
    for record in records:
        producer.produce(TOPIC, codec.encode(record), key=record["user_id"].encode())
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def run_consumer(broker: str, db: Path, *extra: str) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "transitions_consumer.py"),
            "--bootstrap",
            broker,
            "--topic",
            TOPIC,
            "--group",
            "guide-crm-sync",
            "--db",
            str(db),
            "--idle-exit",
            "3",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def final_memberships(records: list[dict]) -> dict[tuple[str, str], tuple[int, int, str]]:
    """(user, segment) -> (sequence, event_time, rule) of the ENTER of each membership still open:
    per (user, segment), the transition with the highest sequence decides."""
    last: dict[tuple[str, str], dict] = {}
    for r in records:
        key = (r["user_id"], r["segment"])
        if key not in last or r["sequence"] > last[key]["sequence"]:
            last[key] = r
    return {
        key: (r["sequence"], r["event_time"], r["reason"]["rule"]) for key, r in last.items() if r["kind"] == "ENTER"
    }


def test_the_example_consumer_acts_once_per_committed_transition_and_the_lookups_read_the_view(
    broker, redis_url, catalog, tmp_path
):
    records = core_transitions(users=60, hours=12)
    assert len(records) > 200 and len({r["transition_id"] for r in records}) == len(records)
    first, replayed, later = records[:100], records[100:-50], records[-50:]
    codec = catalog.codec("SegmentTransition")
    create_topics(broker, {TOPIC: 2})
    producer = Producer({"bootstrap.servers": broker, "transactional.id": "guide-job"})
    producer.init_transactions(30)
    write(producer, codec, first, commit=True)
    # A crash mid-checkpoint: the first attempt's transaction is aborted, the replay commits the
    # same transitions (same ids) again.
    write(producer, codec, replayed, commit=False)
    write(producer, codec, replayed, commit=True)
    committed = first + replayed

    db = tmp_path / "crm.sqlite"
    counts = run_consumer(broker, db)
    assert counts["acted"] == len(committed)
    # tansu hands read_committed clients the aborted attempt too (docs/limits.md); Apache Kafka does not.
    assert counts["repeated"] in (0, len(replayed))
    with sqlite3.connect(db) as conn:
        processed = [row[0] for row in conn.execute("SELECT transition_id FROM processed")]
        memberships = {(u, s): since for u, s, since in conn.execute("SELECT * FROM memberships")}
    assert sorted(processed) == sorted(r["transition_id"] for r in committed)
    assert memberships == {key: at for key, (_, at, _) in final_memberships(committed).items()}

    # Read again from the beginning: every record is a repeat, nothing is acted on twice.
    again = run_consumer(broker, db, "--from-beginning")
    assert again == {"acted": 0, "repeated": counts["acted"] + counts["repeated"]}
    # From the committed offsets: nothing new to read; then only the new transitions.
    assert run_consumer(broker, db) == {"acted": 0, "repeated": 0}
    write(producer, codec, later, commit=True)
    assert run_consumer(broker, db) == {"acted": len(later), "repeated": 0}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM processed").fetchone()[0] == len(records)
        memberships = {(u, s): since for u, s, since in conn.execute("SELECT * FROM memberships")}
    expected = final_memberships(records)
    assert memberships == {key: at for key, (_, at, _) in expected.items()}

    # The Redis view as `segments redis rebuild` writes it from the committed topic, read with
    # the guide's lookups.
    view = RedisSegmentView(redis_url, "seg", 0)
    assert rebuild_from_topic(view, broker, TOPIC).read == len(records)
    view.close()
    spec = importlib.util.spec_from_file_location("segment_lookups", EXAMPLES / "segment_lookups.py")
    lookups = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lookups)
    client = redis.Redis.from_url(redis_url)
    users = {t["user_id"] for t in records}
    segments = {t["segment"] for t in records}
    for user in users:
        assert lookups.segments_of(client, user) == {s: v for (u, s), v in expected.items() if u == user}
        for segment in segments:
            assert lookups.is_member(client, user, segment) == ((user, segment) in expected)
    for segment in segments:
        members = {u for (u, s) in expected if s == segment}
        assert set(lookups.members(client, segment)) == members
        assert lookups.member_count(client, segment) == len(members)
    assert any(expected) and any(len({u for (u, s) in expected if s == seg}) > 1 for seg in segments)
    client.close()
