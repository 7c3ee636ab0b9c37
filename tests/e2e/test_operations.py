"""Operations on the standalone cluster: savepoint, stop with savepoint, rescale 1 -> 2 -> 1 and
resume, while traffic keeps coming; the committed transitions are exactly those of one
uninterrupted run (none lost, none twice) and Redis holds the memberships they imply. The privacy
and identity state moves with the keys: an erasure's tombstone still buries the erased user's
older events, merged anonymous ids still send their events to the known user, and an erased
anonymous id's link stays erased. So do the deployments (broadcast state and the profiles'
versions): a v2 active and a v3 in shadow, deployed before the savepoint, give the transitions and
the shadow transitions of `run_backtest` with the same control records at parallelism 2 and back
at 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from confluent_kafka import Producer

from infra.stack import create_topics
from jobs.backtest import EventLog, run_backtest
from jobs.committed_log import read_topic
from jobs.operations import FlinkRest
from jobs.redis_view import RedisSegmentView
from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from tests.e2e.conftest import job_environment, wait_until
from tests.e2e.invariants import Committed, comparable, redis_differences
from udfs.codec import SchemaCatalog
from udfs.deployments import control_from_record
from udfs.events import UserEvent
from udfs.identity import Identify
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.transitions import replay_events

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

PARTITIONS = 2
# A source subtask reading both partitions may run ahead on one of them: a lag longer than the
# traffic keeps every event ahead of the watermark at parallelism 1 too.
WATERMARK_LAG_MS = 12 * 3600_000
# Users of the privacy and identity checks, apart from the generated traffic (whose transitions
# must stay those of an uninterrupted run): an erased user, two anonymous ids merged into a known
# user, the second one erased after its merge.
VICTIM, ANON, ERASED_ANON, KNOWN = "ops-victim", "ops-anon", "ops-erased-anon", "ops-known"
SYNTHETIC = {VICTIM, ANON, ERASED_ANON, KNOWN}
ERASED_AT = START_MS + HOUR_MS  # every erasure's instant; the watermark stays before it until the sentinels
# The deployments: v2 (the shipped definitions and a segment more) active, v3 (the shipped ones with
# a changed threshold) in shadow.
SHIPPED = SHIPPED_DEFINITIONS.read_text()
ADDED = "long_browser"
V2 = SHIPPED.replace("version: shop-7\n", "version: shop-7-ops-v2\n").replace(
    "segments:\n", f"segments:\n  - name: {ADDED}\n    when: ms_since_last_event < 40m\n"
)
V3 = SHIPPED.replace("version: shop-7\n", "version: shop-7-ops-v3\n").replace(
    "last 10 minutes\n    when: ms_since_last_event < 10m", "last 10 minutes\n    when: ms_since_last_event < 20m"
)


def identify_record(event_id: str, anonymous_id: str, known_id: str, ts: int) -> dict:
    return {**UserEvent(event_id, anonymous_id, "identify", ts).to_record(), "known_user_id": known_id}


@pytest.mark.parametrize("flink_cluster", [2], indirect=True, ids=["two single-slot TaskManagers"])
def test_savepoint_rescale_one_two_one_and_resume_lose_and_repeat_nothing(
    broker, redis_url, flink_cluster, stack_root, catalog
):
    topics = {
        "events": "ops-events",
        "transitions": "ops-transitions",
        "dlq": "ops-dlq",
        "requests": "ops-requests",
        "audit": "ops-audit",
        "identity": "ops-identity",
        "control": "ops-control",
        "status": "ops-status",
        "shadow": "ops-shadow",
    }
    create_topics(
        broker,
        {
            **{topics[t]: PARTITIONS for t in ("events", "transitions", "requests", "identity", "shadow")},
            **{topics[t]: 1 for t in ("dlq", "audit", "control", "status")},
        },
    )
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
            record = e if isinstance(e, dict) else e.to_record()
            producer.produce(topics["events"], key=record["user_id"].encode(), value=codec.encode(record), **kw)
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
        requests_topic=topics["requests"],
        audit_topic=topics["audit"],
        identity_topic=topics["identity"],
        control_topic=topics["control"],
        deployment_status_topic=topics["status"],
        shadow_topic=topics["shadow"],
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

    transitions = catalog.codec("SegmentTransition")

    def committed_records(synthetic: bool = False, topic: str = topics["transitions"]):
        records = read_topic(broker, topic).committed
        return [r for r in records if (r.key.decode() in SYNTHETIC) == synthetic]

    def traffic_records(topic: str) -> list[dict]:  # the generated traffic's, decoded
        return [transitions.decode(r.value) for r in committed_records(topic=topic)]

    def committed() -> int:  # the generated traffic's
        return len(committed_records())

    def synthetic_committed() -> list[dict]:
        return [transitions.decode(r.value) for r in committed_records(synthetic=True)]

    def committed_of(user: str, cause: str):
        return lambda: [t for t in synthetic_committed() if t["user_id"] == user and t["cause"] == cause] or None

    def dead_letters() -> list[dict]:
        return [catalog.codec("DeadLetter").decode(r.value) for r in read_topic(broker, topics["dlq"]).committed]

    # Before the savepoint: a user erased, two anonymous ids merged into a known user, the second
    # one then erased (its link to the known user with it: a request names one id).
    synthetic_events = [
        UserEvent("v1", VICTIM, "page_view", START_MS + 10 * MINUTE_MS),
        UserEvent("a1", ANON, "add_to_cart", START_MS + 5 * MINUTE_MS, product_id="p1", quantity=1, price=9.0),
        UserEvent("b1", ERASED_ANON, "page_view", START_MS + 7 * MINUTE_MS),
        UserEvent("k1", KNOWN, "page_view", START_MS + 6 * MINUTE_MS),
    ]
    identifies = [
        Identify("identify-a", ANON, KNOWN, START_MS + 20 * MINUTE_MS),
        Identify("identify-b", ERASED_ANON, KNOWN, START_MS + 25 * MINUTE_MS),
    ]
    # After the rescale to 2, and again after the one back to 1: an event of the victim older than
    # the erasure (to be buried), and events under the anonymous ids.
    after_out = [
        UserEvent("v-old-1", VICTIM, "add_to_cart", ERASED_AT - 30 * MINUTE_MS, product_id="p", quantity=1, price=1.0),
        UserEvent("a2", ANON, "page_view", START_MS + 2 * HOUR_MS),
        UserEvent("b2", ERASED_ANON, "page_view", START_MS + 2 * HOUR_MS),
    ]
    after_in = [
        UserEvent("v-old-2", VICTIM, "page_view", ERASED_AT - 20 * MINUTE_MS),
        UserEvent("a3", ANON, "add_to_cart", START_MS + 3 * HOUR_MS, product_id="p3", quantity=1, price=2.0),
    ]

    thirds = [
        traffic[: len(traffic) // 3],
        traffic[len(traffic) // 3 : 2 * len(traffic) // 3],
        traffic[2 * len(traffic) // 3 :],
    ]
    produce(thirds[0])
    segments("submit", "--detached")
    first = wait_until(lambda: committed() or None, timeout_s=180, interval_s=2)
    produce(synthetic_events)
    # One merge after the other (their identifies may be on different partitions), as replayed below;
    # the second is done (the anonymous id's MERGE exits are committed, its alias with them) before
    # its erasure is asked for.
    for identify, merged in zip(identifies, (KNOWN, ERASED_ANON), strict=True):
        produce([identify_record(identify.event_id, identify.anonymous_id, identify.known_id, identify.timestamp)])
        wait_until(committed_of(merged, "MERGE"), timeout_s=180, interval_s=2)
    segments("forget", VICTIM, "--at", str(ERASED_AT))
    segments("forget", ERASED_ANON, "--at", str(ERASED_AT))
    wait_until(committed_of(VICTIM, "ERASURE"), timeout_s=180, interval_s=2)
    wait_until(lambda: len(read_topic(broker, topics["audit"]).committed) == 2 or None, timeout_s=180, interval_s=2)
    # v2 active and v3 in shadow from instants after every event sent so far (so that no user's
    # clock has passed them when the records arrive), accepted before the savepoint.
    switch_at = thirds[0][-1].timestamp + 7
    for name, text in (("v2", V2), ("v3", V3)):
        (stack_root / f"{name}.yaml").write_text(text)
    segments("deploy", str(stack_root / "v2.yaml"), "--at", str(switch_at))
    segments("deploy", str(stack_root / "v3.yaml"), "--shadow", "--at", str(switch_at + 1))
    statuses = SchemaCatalog().codec("DeploymentStatus")

    def decided() -> list[str] | None:
        found = [statuses.decode(r.value)["status"] for r in read_topic(broker, topics["status"]).committed]
        return found if len(found) >= 2 else None

    assert wait_until(decided, timeout_s=180, interval_s=2) == ["ACCEPTED", "ACCEPTED"]
    controls = [
        control_from_record(SchemaCatalog().codec("Deployment").decode(r.value))
        for r in read_topic(broker, topics["control"]).committed
    ]
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
    produce(after_out)
    produce(thirds[1])
    wait_until(lambda: committed() > first or None, timeout_s=180, interval_s=2)
    # The rest of the traffic while a subtask reads each partition, consumed in full before the
    # rescale back to 1: one subtask reading both partitions could otherwise take one partition's
    # sentinel before the other's tail and make that tail late (docs/limits.md).
    produce(thirds[2])
    segmentation = Segmentation.load(SHIPPED_DEFINITIONS)
    # The watermark is still before the traffic: no timer has fired.
    event_caused = run_backtest(
        segmentation, EventLog("ops", traffic), watermark_lag_ms=WATERMARK_LAG_MS, deployments=controls
    )
    wait_until(lambda: committed() >= len(event_caused.transitions) or None, timeout_s=180, interval_s=2)
    # At parallelism 2, restored from the savepoint: v2 decides from its instant, v3 in shadow.
    at_two = traffic_records(topics["transitions"])
    assert {t["definitions_version"] for t in at_two if t["event_time"] >= switch_at} == {"shop-7-ops-v2"}
    shadow_at_two = wait_until(lambda: traffic_records(topics["shadow"]), timeout_s=180, interval_s=2)
    assert {t["definitions_version"] for t in shadow_at_two} == {"shop-7-ops-v3"}

    wait_until(lambda: len(dead_letters()) == 1 or None, timeout_s=180, interval_s=2)

    out = segments("rescale", "1")
    assert "resubmitting at parallelism 1" in out
    produce(after_in)
    # Both taken in before the sentinels move the watermark past them (they would be late then).
    wait_until(lambda: len(dead_letters()) == 2 or None, timeout_s=180, interval_s=2)
    wait_until(lambda: [t for t in synthetic_committed() if t["cause_event_id"] == "a3"] or None, 180, 2)
    for p, sentinel in enumerate(sentinels):
        produce([sentinel], partition=p)

    result = run_backtest(
        segmentation,
        EventLog("ops", traffic + sentinels),
        until_ms=last + 2 * DAY_MS - WATERMARK_LAG_MS - 1,
        watermark_lag_ms=WATERMARK_LAG_MS,
        deployments=controls,
    )

    def all_committed(topic: str, count: int):
        records = committed_records(topic=topic)
        return records if len(records) >= count else None

    def as_compared(records: list[dict]) -> list[str]:
        return sorted(json.dumps(comparable(r), sort_keys=True) for r in records)

    main, shadow = topics["transitions"], topics["shadow"]
    records = wait_until(lambda: all_committed(main, len(result.transitions)), timeout_s=300, interval_s=3)
    got = [transitions.decode(r.value) for r in records]
    assert len({t["transition_id"] for t in got}) == len(got), "a transition was committed twice"
    assert as_compared(got) == as_compared([t.to_record(0) for t in result.transitions])
    shadow_records = wait_until(lambda: all_committed(shadow, len(result.shadow_transitions)), 300, 3)
    got_shadow = [transitions.decode(r.value) for r in shadow_records]
    assert as_compared(got_shadow) == as_compared([t.to_record(0) for t in result.shadow_transitions])
    # Back at parallelism 1: the transitions committed since keep v2 from its instant (the timers
    # before it are shop-7's) and v3 in shadow.
    before = {t["transition_id"] for t in at_two}
    at_one = [t for t in got if t["transition_id"] not in before and t["event_time"] >= switch_at]
    shadow_at_one = [t for t in got_shadow if t not in shadow_at_two]
    assert at_one and {t["definitions_version"] for t in at_one} == {"shop-7-ops-v2"}
    assert shadow_at_one and {t["definitions_version"] for t in shadow_at_one} == {"shop-7-ops-v3"}

    # The erasure's tombstone moved with its key: the victim's older events, one after each
    # rescale, are buried (dead-lettered without their payload), not a new profile's.
    assert [(d["reason"], d["payload"]) for d in dead_letters()] == [("erased_user", b"")] * 2
    victim = [t for t in synthetic_committed() if t["user_id"] == VICTIM]
    assert not [t for t in victim if t["cause"] not in ("EVENT", "TIMER", "ERASURE")]
    assert all(t["event_time"] <= ERASED_AT for t in victim)
    # The aliases moved with their keys: the merged id's later events count for the known user,
    # both before and after the rescale back to 1, exactly as a replay of the merge says (which
    # leaves out b2: the erased anonymous id's link is gone, so b2 is its own).
    merged_log = [*synthetic_events[1:], *identifies, after_out[1], after_in[1], *sentinels]
    replayed, _ = replay_events(segmentation.engine(), merged_log, until_ms=last + 2 * DAY_MS - WATERMARK_LAG_MS - 1)

    merged_users = {ANON, KNOWN}
    want_merged = sorted(
        (t.transition_id, t.user_id, t.segment, t.kind, t.cause_event_id) for t in replayed if t.user_id in merged_users
    )

    def merged_committed():
        got = sorted(
            (t["transition_id"], t["user_id"], t["segment"], t["kind"], t["cause_event_id"])
            for t in synthetic_committed()
            if t["user_id"] in merged_users and t["segment"] != ADDED  # the replay is of the start-up version
        )
        return got if len(got) >= len(want_merged) else None

    assert wait_until(merged_committed, timeout_s=180, interval_s=2) == want_merged
    # a2 (before the rescale back to 1) and a3 (after it) made the known user an active browser again.
    assert {"a2", "a3"} <= {cause for _, user, _, _, cause in want_merged if user == KNOWN}
    # b2 made the erased anonymous id a profile of its own.
    assert [
        (t["segment"], t["kind"])
        for t in synthetic_committed()
        if t["user_id"] == ERASED_ANON and t["cause_event_id"] == "b2"
    ]

    # Redis: written by the job's sink once the checkpoint that committed the transitions to Kafka
    # has completed, in no fixed order with the Kafka commit: waited for, not timed.
    view = RedisSegmentView(redis_url, "seg", retention_ms=0)
    log = [Committed(r.partition, r.offset, t) for r, t in zip(records, got, strict=True)]
    wait_until(
        lambda: not redis_differences(log, view, ()),
        timeout_s=60,
        interval_s=0.5,
        on_timeout=lambda: "\n".join(redis_differences(log, view, ())[:10]),
    )
