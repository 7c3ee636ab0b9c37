"""Identity merge through a real broker and the real job (docs/architecture.md, "Identity merge
across keys"): an anonymous id's events, an identify, then events under the anonymous id. The
anonymous id EXITs its segments with cause MERGE, the known user enters what the union of both
ids' events qualifies for, later anonymous events count for the known user, and the committed
transitions are exactly the backtest's over the same log (the fold travels through the job's
feedback topic; each phase is produced once the one before it is committed, so no event of the
known user races the fold, which is the one thing the backtest cannot reproduce). Then the known
user is erased: the erasure reaches the anonymous id folded into them through the same feedback
topic (docs/privacy.md, "A request names one id"), which keeps nothing of it: no alias (its later
events are its own), no Redis entry, its older events buried, one audit record."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from infra.stack import create_topics, start_taskmanager, taskmanager_pids
from jobs.backtest import read_events, read_requests, run_backtest
from jobs.committed_log import read_topic
from tests.conftest import START_MS
from tests.e2e.conftest import wait_until
from tests.e2e.test_job_end_to_end import apache_decode, apache_reader, millis
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.privacy import ERASE, FAN_OUT_SOURCE, UserRequest, user_hash
from udfs.profile_config import DAY_MS, MINUTE_MS

pytestmark = pytest.mark.e2e

WATERMARK_LAG_MS = 2_000
ANON, KNOWN = "anon-7", "known-7"
T = START_MS
DEFINITIONS = """
version: merge-e2e
segments:
  - name: active_browser
    when: ms_since_last_event < 10m
  - name: cart_holder
    when: cart_items > 0
  - name: shoes_viewer
    when: category_views_24h["shoes"] >= 2
  - name: three_carts
    when: count_add_to_cart_24h >= 3
"""


def view(event_id: str, user: str, ts: int) -> UserEvent:
    return UserEvent(event_id, user, "product_view", ts, product_id="p-shoes-1", category="shoes")


def cart(event_id: str, user: str, ts: int, product: str) -> UserEvent:
    return UserEvent(event_id, user, "add_to_cart", ts, product_id=product, quantity=1, price=10.0)


def test_an_identify_folds_the_anonymous_profile_into_the_known_users(broker, redis_url, run_job, catalog, tmp_path):
    check_identity_merge(broker, redis_url, run_job, catalog, tmp_path, checkpoint_interval_ms=1000)


@pytest.mark.cluster
def test_a_taskmanager_killed_between_the_identify_and_its_checkpoint_merges_once(
    broker, redis_url, submit_job, catalog, tmp_path, stack_root
):
    """The identify has been processed (its EXITs are in an open transaction) and no checkpoint
    has committed it when the TaskManager dies: the job restores the anonymous id's state from
    the checkpoint before, the feedback record is never visible, the identify is read again, and
    the merge happens exactly once (the final comparison with the backtest counts every
    transition)."""

    def kill_before_the_commit(topics: dict[str, str]) -> None:
        wait_until(
            lambda: any(
                t["user_id"] == ANON and t["cause"] == "MERGE" for t in uncommitted(broker, topics["transitions"])
            ),
            timeout_s=240,
            interval_s=0.2,
        )
        committed_merges = [  # the identify's id is the MERGE transitions' cause_event_id
            r for r in read_topic(broker, topics["transitions"]).committed if b"identify-1" in r.value
        ]
        assert not committed_merges, "the checkpoint came first: the kill would not be between"
        pids = taskmanager_pids(stack_root)
        assert pids, "no TaskManager to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not taskmanager_pids(stack_root), timeout_s=30, interval_s=0.2)
        start_taskmanager(stack_root)

    check_identity_merge(
        broker,
        redis_url,
        submit_job,
        catalog,
        tmp_path,
        checkpoint_interval_ms=20_000,
        after_identify=kill_before_the_commit,
    )


def uncommitted(broker: str, topic: str) -> list[dict]:
    """Every transition in the topic, those of open transactions too (read_uncommitted)."""
    reader = apache_reader("segment_transition.avsc")
    consumer = Consumer(
        {
            "bootstrap.servers": broker,
            "group.id": f"uncommitted-{time.monotonic_ns()}",
            "isolation.level": "read_uncommitted",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])  # no group join: one partition
        out = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                if out:
                    break
                continue
            if message.error() is None:
                out.append(apache_decode(reader, message.value()))
        return out
    finally:
        consumer.close()


def check_identity_merge(broker, redis_url, start_job, catalog, tmp_path, checkpoint_interval_ms, after_identify=None):
    topics = {
        "events": "id-events",
        "transitions": "id-transitions",
        "dlq": "id-dlq",
        "identity": "id-feedback",
        "requests": "id-requests",
        "audit": "id-audit",
    }
    create_topics(broker, dict.fromkeys(topics.values(), 1))  # one partition: the log's order is the backtest's
    definitions = tmp_path / "merge.yaml"
    definitions.write_text(DEFINITIONS)
    codec = catalog.codec("UserEvent")
    producer = Producer({"bootstrap.servers": broker, "enable.idempotence": True})
    reader = apache_reader("segment_transition.avsc")

    def produce(*records: dict) -> None:
        for record in records:
            producer.produce(topics["events"], key=record["user_id"].encode(), value=codec.encode(record))
        assert producer.flush(30) == 0

    job = start_job(
        bootstrap_servers=broker,
        redis_url=redis_url,
        parallelism=1,
        checkpoint_interval_ms=checkpoint_interval_ms,
        watermark_lag_ms=WATERMARK_LAG_MS,
        events_topic=topics["events"],
        transitions_topic=topics["transitions"],
        dead_letter_topic=topics["dlq"],
        identity_topic=topics["identity"],
        requests_topic=topics["requests"],
        audit_topic=topics["audit"],
        definitions_path=str(definitions),
        transactional_id_prefix="id-e2e",
        redis_follower=False,
    )

    def committed() -> list[dict]:
        job.assert_alive()
        return [apache_decode(reader, r.value) for r in read_topic(broker, topics["transitions"]).committed]

    def wait_for(predicate, what: str) -> list[dict]:
        return wait_until(
            lambda: (lambda got: got if predicate(got) else None)(committed()),
            timeout_s=180,
            interval_s=2,
            on_timeout=lambda: f"waiting for {what}\n" + job.log_tail(),
        )

    # Phase 1: both ids browse; each holds a cart and one shoe view (neither is a shoes_viewer).
    identify = {**UserEvent("identify-1", ANON, "identify", T + 3 * MINUTE_MS).to_record(), "known_user_id": KNOWN}
    produce(
        view("a1", ANON, T).to_record(),
        cart("a2", ANON, T + MINUTE_MS, "p1").to_record(),
        view("k1", KNOWN, T + 30_000).to_record(),
        cart("k2", KNOWN, T + 2 * MINUTE_MS, "p2").to_record(),
        identify,
    )
    if after_identify is not None:
        after_identify(topics)
    got = wait_for(lambda ts: any(t["user_id"] == KNOWN and t["cause"] == "MERGE" for t in ts), "the merge")
    anonymous_exits = [t for t in got if t["user_id"] == ANON and t["kind"] == "EXIT"]
    assert {t["segment"] for t in anonymous_exits} == {"active_browser", "cart_holder"}
    assert all(
        (t["cause"], t["cause_event_id"], t["reason"]["rule"], millis(t["event_time"]))
        == ("MERGE", "identify-1", "identity_merged", T + 3 * MINUTE_MS)
        for t in anonymous_exits
    )
    merged = [t for t in got if t["user_id"] == KNOWN and t["cause"] == "MERGE"]
    # The union has two shoe views: the known user qualifies only with the anonymous history.
    assert [(t["segment"], t["kind"]) for t in merged] == [("shoes_viewer", "ENTER")]
    assert merged[0]["reason"]["features"] == {"category_views_24h[shoes]": 2.0}

    # Phase 2: a later event under the anonymous id counts for the known user (its third add_to_cart).
    produce(cart("a3", ANON, T + 4 * MINUTE_MS, "p3").to_record())
    got = wait_for(lambda ts: any(t["segment"] == "three_carts" for t in ts), "the forwarded event")
    three = [t for t in got if t["segment"] == "three_carts"]
    assert [(t["user_id"], t["kind"], t["cause_event_id"]) for t in three] == [(KNOWN, "ENTER", "a3")]
    assert not [
        t for t in got if t["user_id"] == ANON and t["kind"] == "ENTER" and millis(t["event_time"]) > T + MINUTE_MS
    ]

    # Phase 3: the known user is erased; the erasure reaches the anonymous id folded into them.
    erased_at = T + 5 * MINUTE_MS
    erasure = UserRequest("forget-known-7", KNOWN, ERASE, erased_at, "e2e")
    producer.produce(
        topics["requests"], key=KNOWN.encode(), value=catalog.codec("UserRequest").encode(erasure.to_record())
    )
    assert producer.flush(30) == 0
    audit_codec = catalog.codec("ErasureAudit")

    def audits() -> list[dict]:
        job.assert_alive()
        return [audit_codec.decode(r.value) for r in read_topic(broker, topics["audit"]).committed]

    fanned_out_id = f"{erasure.request_id}+{user_hash(ANON)[:16]}"
    got_audits = wait_until(
        lambda: (lambda a: a if any(r["request_id"] == fanned_out_id for r in a) else None)(audits()),
        timeout_s=180,
        interval_s=2,
        on_timeout=lambda: "waiting for the anonymous id's erasure\n" + job.log_tail(),
    )
    by_user = {a["user_hash"]: a for a in got_audits}
    assert sorted(a["user_hash"] for a in got_audits) == sorted([user_hash(KNOWN), user_hash(ANON)])  # each once
    assert "identity_folds" in by_user[user_hash(KNOWN)]["erased"]
    anonymous_audit = by_user[user_hash(ANON)]
    assert (anonymous_audit["request_id"], anonymous_audit["requested_at"], anonymous_audit["source"]) == (
        fanned_out_id,
        erased_at,
        FAN_OUT_SOURCE + "e2e",
    )
    assert "identity_alias" in anonymous_audit["erased"]
    # Nothing of either id is left in the Redis view (the erasure markers of both committed).
    redis_client = redis.Redis.from_url(redis_url)
    wait_until(
        lambda: not [k for u in (ANON, KNOWN) for k in redis_client.scan_iter(match=f"seg:*:{u}")],
        timeout_s=120,
        interval_s=1,
        on_timeout=lambda: f"Redis keys left: {sorted(redis_client.scan_iter(match='seg:*'))}",
    )
    # An older event of the anonymous id is buried there (no alias sends it on); a later one is
    # its own: a new profile, not the known user's.
    produce(UserEvent("a4", ANON, "page_view", erased_at - 30_000).to_record())
    produce(UserEvent("a5", ANON, "page_view", T + 6 * MINUTE_MS).to_record())
    got = wait_for(
        lambda ts: any(t["user_id"] == ANON and t["cause_event_id"] == "a5" for t in ts), "the anonymous id's return"
    )
    assert [(t["segment"], t["kind"]) for t in got if t["cause_event_id"] == "a5"] == [("active_browser", "ENTER")]
    assert [t["user_id"] for t in got if t["cause"] == "ERASURE"] == [KNOWN] * 4  # the anonymous id was in none

    # Phase 4: a day later every time-driven change has fired; the job's transitions are the backtest's.
    produce(UserEvent("sentinel-1", "sentinel", "page_view", T + 2 * DAY_MS).to_record())
    log = read_events(f"kafka://{broker}/{topics['events']}")
    log.requests, _ = read_requests(f"kafka://{broker}/{topics['requests']}")
    result = run_backtest(parse_definitions(DEFINITIONS, str(definitions)), log, watermark_lag_ms=WATERMARK_LAG_MS)
    assert [(e.request_id, e.user_hash) for e in result.erasures] == [
        (erasure.request_id, user_hash(KNOWN)),
        (fanned_out_id, user_hash(ANON)),
    ]
    want = sorted(
        (t.user_id, t.segment, t.kind, t.sequence, t.event_time, t.cause, t.cause_event_id, t.rule)
        for t in result.transitions
    )
    # The merged cart stays until the erasure.
    assert [w[5] for w in want if w[:3] == (KNOWN, "cart_holder", "EXIT")] == ["ERASURE"]
    got = wait_for(lambda ts: len(ts) >= len(want), "the day's timers")
    assert (
        sorted(
            (
                t["user_id"],
                t["segment"],
                t["kind"],
                t["sequence"],
                millis(t["event_time"]),
                t["cause"],
                t["cause_event_id"],
                t["reason"]["rule"],
            )
            for t in got
        )
        == want
    )
    dead = [catalog.codec("DeadLetter").decode(r.value) for r in read_topic(broker, topics["dlq"]).committed]
    assert [(d["reason"], d["payload"]) for d in dead] == [("erased_user", b"")], "only the buried event"
