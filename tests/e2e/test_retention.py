"""One retention (issue 18.4): the profile retention is the only setting, and when a user has been
inactive past it the core's state and timer, the user's Redis keys and their place in every member
set all go. The core runs the per-user step every runner runs, the view is written by the real
writer (the apply script the job's sink runs too) into a real redis-server, and event time is
advanced past a 2-second retention (wall time too, for what Redis keeps by the clock)."""

from __future__ import annotations

import time

import pytest

from jobs.redis_view import RedisSegmentView
from tests.e2e.invariants import Committed, redis_differences
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.profile import UserProfile
from udfs.profile_config import Horizon, ProfileConfig
from udfs.transitions import RETENTION_RULE, SegmentEngine, Transition

pytestmark = pytest.mark.e2e

RETENTION_MS = 2_000
CONFIG = ProfileConfig(horizons=(Horizon("2s", 2_000, 1_000),), retention_ms=RETENTION_MS)
DEFINITIONS = """
version: retention-test
segments:
  - name: buyer
    when: lifetime_orders >= 1
  - name: cart_holder
    when: cart_items > 0
"""
SEGMENTS = ("buyer", "cart_holder")


class Runner:
    """The core's users and what a job would have committed and written to Redis."""

    def __init__(self, view: RedisSegmentView):
        self.engine = SegmentEngine(parse_definitions(DEFINITIONS, "retention.yaml", CONFIG))
        self.view = view
        self.profiles: dict[str, UserProfile] = {}
        self.committed: list[Committed] = []
        self.dropped: set[str] = set()

    def event(self, user_id: str, kind: str, at_ms: int) -> None:
        profile = self.profiles.setdefault(user_id, UserProfile())
        event = UserEvent(
            f"{user_id}-{at_ms}-{kind}", user_id, kind, at_ms, product_id="p1", category="c", price=10.0, quantity=1
        )
        self._commit(user_id, self.engine.step_event(user_id, profile, event))

    def advance(self, to_ms: int) -> None:
        """The watermark passes `to_ms`: every user's timer due by then fires (the step walks
        every change due up to it, as the timers would one by one)."""
        for user_id, profile in list(self.profiles.items()):
            if profile.timer_ms is not None and profile.timer_ms <= to_ms:
                self._commit(user_id, self.engine.step_timer(user_id, profile, to_ms))

    def _commit(self, user_id: str, step) -> None:
        transitions: list[Transition] = step.transitions
        for t in transitions:
            self.committed.append(Committed(0, len(self.committed), t.to_record(0)))
        self.view.apply([(t.user_id, t.segment, t.kind, t.sequence, t.event_time, t.rule) for t in transitions])
        if step.drop_state:  # as the job: nothing of the user is kept, and no timer asked for
            assert step.register_timer_ms is None and self.profiles[user_id].timer_ms is None
            assert self.engine.next_change_ms(self.profiles[user_id]) is None
            del self.profiles[user_id]
            self.dropped.add(user_id)


def keys_of(view: RedisSegmentView, user_id: str) -> list[bytes]:
    return sorted(k for k in view.client.keys("t:*") if k.endswith(f":{user_id}".encode()))


def test_a_user_inactive_past_the_retention_leaves_state_timer_redis_keys_and_member_sets_together(redis_url):
    view = RedisSegmentView(redis_url, "t", retention_ms=CONFIG.retention_ms)
    run = Runner(view)
    t0 = 1_800_000_000_000
    # quiet: buys once and holds `buyer` (a segment no time lapses) and `cart_holder`, then nothing.
    run.event("quiet", "add_to_cart", t0)
    run.event("quiet", "purchase", t0 + 100)
    run.event("quiet", "add_to_cart", t0 + 200)
    # active: a buyer who keeps coming back without ever changing segment (no transition after
    # the first): layout 1 dropped such a member's keys 30 days after that transition.
    run.event("active", "purchase", t0)
    # browser: held a segment and left it, so holds none: only its sequence guard is in Redis.
    run.event("browser", "add_to_cart", t0)
    run.event("browser", "remove_from_cart", t0 + 300)
    quiet = run.profiles["quiet"].memberships
    assert view.segments_of("quiet") == {
        "buyer": (quiet["buyer"].sequence, t0 + 100),
        "cart_holder": (quiet["cart_holder"].sequence, t0 + 200),
    }
    assert view.members("buyer") == {"quiet", "active"} and view.members("cart_holder") == {"quiet"}
    assert view.client.pttl("t:user:quiet") == -1 and view.client.pttl("t:seq:quiet") == -1  # members: no clock
    guard_ttl = view.client.pttl("t:seq:browser")
    assert 0 < guard_ttl <= RETENTION_MS and not view.client.exists("t:user:browser")

    for at in range(t0 + 500, t0 + 4_000, 500):  # active stays active, with no transition
        run.event("active", "product_view", at)
        run.advance(at)
    # Event time is past quiet's last event + the retention (t0 + 2,200) and browser's (t0 + 2,300).
    for user_id in ("quiet", "browser"):
        assert user_id in run.dropped and user_id not in run.profiles  # state and timer gone
    exits = [
        c.record
        for c in run.committed
        if c.record["user_id"] == "quiet" and c.record["kind"] == "EXIT" and c.record["event_time"] > t0 + 200
    ]
    assert {(r["segment"], r["reason"]["rule"], r["event_time"]) for r in exits} == {
        ("buyer", RETENTION_RULE, t0 + 200 + RETENTION_MS),
        ("cart_holder", RETENTION_RULE, t0 + 200 + RETENTION_MS),
    }
    assert keys_of(view, "quiet") == []  # user hash and sequence guard: deleted with the last EXIT
    assert "quiet" not in view.members("buyer") | view.members("cart_holder")
    # active was never quiet for the retention: still in the state and in Redis, member and entry.
    assert "active" in run.profiles and view.members("buyer") == {"active"}
    assert [(c.segment, c.rule) for c in view.current_segments("active")] == [("buyer", "lifetime_orders >= 1")]
    assert redis_differences(run.committed, view, SEGMENTS) == []

    # active goes quiet too: past its retention nothing of anyone is left anywhere.
    last_active = t0 + 3_500
    run.advance(last_active + RETENTION_MS)
    assert run.profiles == {} and run.dropped == {"quiet", "active", "browser"}
    assert redis_differences(run.committed, view, SEGMENTS) == []
    assert sorted(view.client.keys("t:*")) == [b"t:seq:browser"]  # browser's guard, on the wall clock
    time.sleep(view.client.pttl("t:seq:browser") / 1000 + 0.1)
    assert view.client.keys("t:*") == []


def test_the_retention_exits_of_a_replay_after_the_guard_is_gone_still_leave_nothing(redis_url):
    """A writer behind the other (the follower after the sink; a restored checkpoint's committables
    committed again) applies the retention EXITs once more after the first write deleted the
    sequence guard: they are applied again and delete it again, and the view stays the replay."""
    view = RedisSegmentView(redis_url, "t", retention_ms=CONFIG.retention_ms)
    run = Runner(view)
    t0 = 1_800_000_000_000
    run.event("u", "add_to_cart", t0)
    run.event("u", "purchase", t0 + 10)
    run.event("u", "add_to_cart", t0 + 20)
    run.advance(t0 + 20 + RETENTION_MS)
    assert "u" in run.dropped and view.client.keys("t:*") == []
    again = [c.record for c in run.committed]
    view.apply(
        [(r["user_id"], r["segment"], r["kind"], r["sequence"], r["event_time"], r["reason"]["rule"]) for r in again]
    )
    assert view.client.keys("t:*") == []
    assert redis_differences(run.committed, view, SEGMENTS) == []


def test_keys_of_layout_1_lose_their_ttl_at_the_users_next_transition(redis_url):
    """Layout 1 gave a user's keys a 30-day TTL and stored no rule: a member's keys written so must
    not expire under them once the new writer has touched the user."""
    view = RedisSegmentView(redis_url, "t", retention_ms=CONFIG.retention_ms)
    view.client.hset("t:user:old", "buyer", "3:1000")  # as layout 1 wrote them
    view.client.hset("t:seq:old", "buyer", "3")
    view.client.sadd("t:members:buyer", "old")
    for key in ("t:user:old", "t:seq:old"):
        view.client.expire(key, 30 * 24 * 3600)
    assert [(c.segment, c.sequence, c.entered_at_ms, c.rule) for c in view.current_segments("old")] == [
        ("buyer", 3, 1000, "")
    ]
    view.apply([("old", "cart_holder", "ENTER", 4, 2000, "cart_items > 0")])
    assert view.client.pttl("t:user:old") == -1 and view.client.pttl("t:seq:old") == -1
    assert view.segments_of("old") == {"buyer": (3, 1000), "cart_holder": (4, 2000)}


def test_redis_upgrade_clears_layout_1s_ttl_from_members_only(redis_url, monkeypatch, capsys):
    """`segments redis upgrade`: the keys layout 1 gave a 30-day TTL no longer expire when the user
    is in a segment; a user in no segment keeps the TTL of their sequence hash."""
    from jobs import cli

    old = RedisSegmentView(redis_url, "t", retention_ms=0)
    month = 30 * 24 * 3600
    for i in range(1_500):  # more than one pipeline's worth
        old.client.hset(f"t:user:m{i}", "buyer", "3:1000")
        old.client.hset(f"t:seq:m{i}", "buyer", "3")
        old.client.sadd("t:members:buyer", f"m{i}")
        old.client.expire(f"t:user:m{i}", month)
        old.client.expire(f"t:seq:m{i}", month)
    old.client.hset("t:seq:gone", "buyer", "4")  # left every segment under layout 1
    old.client.expire("t:seq:gone", month)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("SEGMENTS_REDIS_KEY_PREFIX", "t")

    assert cli.main(["redis", "upgrade"]) == 0
    assert capsys.readouterr().out.startswith("1500 users in a segment")
    assert {old.client.pttl(f"t:{kind}:m{i}") for kind in ("user", "seq") for i in range(1_500)} == {-1}
    assert 0 < old.client.ttl("t:seq:gone") <= month
    assert cli.main(["redis", "upgrade"]) == 0 and capsys.readouterr().out.startswith("1500 users")
