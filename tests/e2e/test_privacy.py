"""Erasure and consent on the standalone cluster under traffic, with a TaskManager killed after
the job has made an erasure's transitions and audit record but before the checkpoint holding them
completed: after recovery the user is erased exactly once (ERASURE exits and one audit record
committed, the first attempt's aborted), nothing of them is in Redis, their later-arriving older
event is not resurrected, and what the job committed equals the engine-free core's replay of the
same records in the order the job saw each user's (so no profile of theirs survived in state:
their comeback event starts a fresh lifetime, as in the core)."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from infra.stack import create_topics
from jobs.backtest import read_requests
from jobs.committed_log import read_topic
from jobs.redis_view import RedisSegmentView
from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from tests.e2e.invariants import (
    Committed,
    differences_from_fault_free,
    missing_transitions,
    redis_differences,
    repeated_or_out_of_sequence,
)
from tests.e2e.test_faults import FaultRun
from udfs.events import UserEvent
from udfs.privacy import CONSENT, ERASE, SCORING, SEGMENTATION, PrivacyState, UserRequest, user_hash
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.faults]

PARTITIONS = 2
WATERMARK_LAG_MS = 60_000
# The held-back users' events come after the other users' second half has moved the watermark on
# by up to the traffic's span: within this lateness they are not late. It is also how long the
# erasure's tombstone lasts (12 h after the request), well before the sentinels' final watermark.
ALLOWED_LATENESS_MS = 12 * HOUR_MS
# Long enough that the TaskManager is killed before the checkpoint after the erasure completes.
CHECKPOINT_INTERVAL_MS = 15_000


def core_replay(segmentation, records, until_ms):
    """What the job must commit: the core over each user's records in the order the job sees them."""
    engine = segmentation.engine()
    profiles: dict[str, UserProfile] = {}
    privacy: dict[str, PrivacyState] = {}
    out = []
    for record in records:
        profile = profiles.setdefault(record.user_id, UserProfile())
        state = privacy.setdefault(record.user_id, PrivacyState())
        if isinstance(record, UserRequest):
            out += engine.step_request(record.user_id, profile, state, record, ALLOWED_LATENESS_MS).transitions
        else:
            out += engine.step_event(record.user_id, profile, record, privacy=state).transitions
    for user_id, profile in profiles.items():
        out += engine.step_timer(user_id, profile, until_ms, privacy[user_id]).transitions
    return out, profiles, privacy


def member_at(profiles: dict[str, UserProfile], users, pick) -> str:
    return next(u for u in users if any(pick(name) and m.member for name, m in profiles[u].memberships.items()))


def test_erasure_and_consent_under_traffic_survive_a_taskmanager_kill_before_the_checkpoint(
    broker, redis_url, flink_cluster, stack_root, catalog
):
    segmentation = Segmentation.load(SHIPPED_DEFINITIONS)
    generated = list(generate_events(80, seed=31, start_ms=START_MS, duration_ms=10 * HOUR_MS))
    half = len(generated) // 2
    first, second = generated[:half], generated[half:]
    erased_at = first[-1].timestamp + 1
    # Who the requests are for: users in segments after the first half (as the core has them).
    _, profiles_then, _ = core_replay(segmentation, first, erased_at - 1)
    active = [u for u in dict.fromkeys(e.user_id for e in second) if u in profiles_then]
    victim = member_at(profiles_then, active, lambda name: True)
    withdrawn = member_at(profiles_then, [u for u in active if u != victim], lambda name: True)
    scored = member_at(
        profiles_then, [u for u in active if u not in (victim, withdrawn)], lambda name: name == "likely_buyer"
    )
    # A user in no segment whom the view still holds: the sequence hash a user leaving a segment
    # keeps (an EXIT that is no lifetime end: here, of a segment since removed from the
    # definitions; the shipped ones put every user with a profile in a tier). No EXIT reaches it;
    # the erasure marker must delete it.
    quiet = "quiet-erased"
    held = {victim, withdrawn, scored}
    # As a consent platform writes them; the victim's erasure comes from `segments forget` below.
    consents = [
        UserRequest("consent-1", withdrawn, CONSENT, erased_at, "e2e", SEGMENTATION, False),
        UserRequest("consent-2", scored, CONSENT, erased_at, "e2e", SCORING, False),
        UserRequest("erase-quiet", quiet, ERASE, erased_at, "e2e"),
    ]
    others_second = [e for e in second if e.user_id not in held]
    held_second = [e for e in second if e.user_id in held]
    # The victim's event from before the erasure, arriving after it; and their comeback.
    buried = UserEvent("buried-1", victim, "add_to_cart", erased_at - 1, product_id="p-1", quantity=1, price=9.0)
    comeback = UserEvent("comeback-1", victim, "page_view", second[-1].timestamp + 1)
    sentinels = [
        UserEvent(f"sentinel-{p}", f"sentinel-{p}", "page_view", second[-1].timestamp + DAY_MS)
        for p in range(PARTITIONS)
    ]
    final_watermark = sentinels[0].timestamp - WATERMARK_LAG_MS - 1

    run = FaultRun(
        broker,
        redis_url,
        flink_cluster,
        stack_root,
        catalog,
        "privacy",
        requests_topic="privacy-requests",
        audit_topic="privacy-audit",
        allowed_lateness_ms=ALLOWED_LATENESS_MS,
        redis_follower="false",
    )
    # FaultRun's own lag and checkpoints are the fault suite's; these are this test's.
    run.env.update(
        SEGMENTS_WATERMARK_LAG_MS=str(WATERMARK_LAG_MS), SEGMENTS_CHECKPOINT_INTERVAL_MS=str(CHECKPOINT_INTERVAL_MS)
    )
    create_topics(broker, {"privacy-requests": PARTITIONS, "privacy-audit": 1})
    request_codec = catalog.codec("UserRequest")
    requester = Producer({"bootstrap.servers": broker, "enable.idempotence": True})

    run.produce_events(first)
    run.segments("submit", "--detached")
    core_first = {t.transition_id for t in core_replay(segmentation, first, 0)[0]}
    wait_until_committed(run, core_first)

    # Under traffic: the other users' second half flows while the requests are made.
    sender = threading.Thread(target=run.produce_paced, args=(others_second, 100))
    sender.start()
    probe = UncommittedProbe(broker, run.topics["transitions"], victim, catalog)
    view = RedisSegmentView(redis_url, "seg", retention_ms=0)
    view.client.hset(f"seg:seq:{quiet}", "retired_segment", str(erased_at * 1000 - 5))
    for r in consents:
        requester.produce("privacy-requests", key=r.user_id.encode(), value=request_codec.encode(r.to_record()))
    assert requester.flush(30) == 0
    said = run.segments("forget", victim, "--at", str(erased_at))
    erasure = UserRequest(said.split()[2], victim, ERASE, erased_at, "segments-cli")
    requests = [*consents, erasure]
    # The job has made the erasure's transitions (in its open transaction) ...
    probe.wait_for_erasure()
    # ... and loses them with the TaskManager before their checkpoint completes.
    run.kill_taskmanager()
    sender.join()
    arrival = [*first, *requests, *others_second, buried, *held_second, comeback, *sentinels]
    expected, profiles, privacy = core_replay(segmentation, arrival, final_watermark)
    causes = {(t.user_id, t.cause) for t in expected}
    assert {(victim, "ERASURE"), (withdrawn, "CONSENT"), (scored, "CONSENT")} <= causes
    assert not privacy[victim].consent and privacy[victim].erased_at_ms is None  # the tombstone lapsed
    assert not [t for t in expected if t.user_id == quiet]  # nothing to EXIT
    erasure_ids = {t.transition_id for t in expected if t.cause == "ERASURE"}
    wait_until_committed(run, erasure_ids)
    run.produce_events([buried, *held_second, comeback])
    for p, sentinel in enumerate(sentinels):
        run.produce_events([sentinel], partition=p)
    wait_until_committed(run, {t.transition_id for t in expected})

    committed = run.committed()
    problems = {
        "missing": missing_transitions(expected, committed),
        "repeated or out of sequence": repeated_or_out_of_sequence(committed),
        "differs from the core": differences_from_fault_free(expected, committed),
    }
    failing = {k: v[:8] for k, v in problems.items() if v}
    assert not failing, failing
    # The kill came between the erasure and its checkpoint: the first attempt's were aborted.
    transitions_codec = catalog.codec("SegmentTransition")
    aborted = [transitions_codec.decode(r.value) for r in read_topic(broker, run.topics["transitions"]).aborted]
    assert any(r["user_id"] == victim and r["cause"] == "ERASURE" for r in aborted), "the kill came too late"
    erased_exits = [c.record for c in committed if c.record["user_id"] == victim and c.record["cause"] == "ERASURE"]
    assert erased_exits and len(erased_exits) == len({r["segment"] for r in erased_exits})
    assert all(
        (r["kind"], r["reason"]["rule"], r["reason"]["features"], r["event_time"])
        == ("EXIT", "user_erased", {}, erased_at)
        for r in erased_exits
    )
    # Withdrawn segmentation: nothing of the user's later events; scoring: no scores after it.
    assert not [c for c in committed if c.record["user_id"] == withdrawn and c.record["event_time"] > erased_at]
    assert all(
        not c.record["reason"]["scores"]
        for c in committed
        if c.record["user_id"] == scored and c.record["event_time"] >= erased_at
    )

    # The audit trail: the erasure once, committed, under the id's hash; the id nowhere in it.
    audit_log = read_topic(broker, "privacy-audit")
    audit_codec = catalog.codec("ErasureAudit")
    audits = [audit_codec.decode(r.value) for r in audit_log.committed]
    assert sorted((a["request_id"], a["user_hash"], a["requested_at"]) for a in audits) == sorted(
        [(erasure.request_id, user_hash(victim), erased_at), ("erase-quiet", user_hash(quiet), erased_at)]
    )
    assert "profile" in next(a["erased"] for a in audits if a["request_id"] == erasure.request_id)
    assert all(u.encode() not in r.value for r in audit_log.committed for u in (victim, quiet))
    assert len(audit_log.aborted) >= 1  # the first attempt's record, aborted with its transaction

    # The buried event: dead-lettered without its payload; the job never applied it (the core did not).
    dlq = [catalog.codec("DeadLetter").decode(r.value) for r in read_topic(broker, run.topics["dlq"]).committed]
    assert [(d["reason"], d["payload"]) for d in dlq] == [("erased_user", b"")]

    # Redis: the view equals the log, and nothing of the erased and withdrawn users' first
    # lifetimes is left (the victim's comeback is a new lifetime with its own keys).
    deadline = time.monotonic() + 120
    while redis_differences(committed, view, segmentation.definitions.names) and time.monotonic() < deadline:
        time.sleep(2)
    assert not redis_differences(committed, view, segmentation.definitions.names)
    assert not list(view.client.scan_iter(match=f"seg:*:{withdrawn}"))
    # The user erased in no segment: in no key any more.
    assert not list(view.client.scan_iter(match=f"seg:*:{quiet}"))
    old_sequences = {int(v) for v in view.client.hvals(f"seg:seq:{victim}")}
    assert all(s > erased_at * 1000 for s in old_sequences), "a sequence of the erased lifetime is left"
    after_comeback = {name for name, m in profiles[victim].memberships.items() if m.member}
    assert set(view.segments_of(victim)) == after_comeback

    # The backtest reads the same requests back from the topic.
    replayed, rejected = read_requests(f"kafka://{broker}/privacy-requests")
    assert sorted(replayed, key=lambda r: r.request_id) == sorted(requests, key=lambda r: r.request_id)
    assert not rejected


def wait_until_committed(run: FaultRun, ids: set[str]) -> list[Committed]:
    from tests.e2e.conftest import wait_until

    def done():
        got = run.committed()
        return ids <= {c.transition_id for c in got} and got

    return wait_until(done, timeout_s=300, interval_s=2, on_timeout=run.cluster_log)


class UncommittedProbe:
    """Reads the transitions topic as read_uncommitted from its beginning, assigned (no group
    join, so it sees the job's open transaction within a poll), for an ERASURE of one user."""

    def __init__(self, broker: str, topic: str, user_id: str, catalog):
        self.codec = catalog.codec("SegmentTransition")
        self.key = user_id.encode()
        self.consumer = Consumer(
            {
                "bootstrap.servers": broker,
                "group.id": "privacy-probe",
                "isolation.level": "read_uncommitted",
                "enable.auto.commit": False,
            }
        )
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])

    def wait_for_erasure(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for msg in self.consumer.consume(1000, 0.1):
                    if msg.error() or msg.key() != self.key:
                        continue
                    if self.codec.decode(msg.value())["cause"] == "ERASURE":
                        return
            raise AssertionError(f"the job made no ERASURE transition within {timeout_s:.0f} s")
        finally:
            self.consumer.close()
