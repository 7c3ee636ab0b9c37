"""The built-in segments and the engine that turns events and passing time into transitions."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import START_MS
from tests.unit.basic_definitions import BASIC_VERSION, basic_definitions
from udfs.conditions import Evaluation
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.profile import UserProfile, prune
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS, Horizon, ProfileConfig
from udfs.shoppers import generate_events
from udfs.transitions import TRANSITION_ID_NAMESPACE, SegmentEngine, Transition, replay_events, transition_id

T0 = START_MS
SEQ0 = T0 * 1000  # transition sequences of a profile lifetime that starts at T0 start above this
RETENTION = 90 * DAY_MS


def engine() -> SegmentEngine:
    return SegmentEngine(basic_definitions())


def ev(n: int, ts: int, kind: str = "page_view", user: str = "u1", **fields) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, kind, ts, **fields)


def add(n: int, ts: int, product: str = "p1", quantity: int | None = 1, price: float = 10.0) -> UserEvent:
    return ev(n, ts, "add_to_cart", product_id=product, quantity=quantity, price=price)


def remove(n: int, ts: int, product: str = "p1", quantity: int | None = 1) -> UserEvent:
    return ev(n, ts, "remove_from_cart", product_id=product, quantity=quantity)


def summary(transitions: list[Transition]) -> list[tuple]:
    return [(t.segment, t.kind, t.event_time, t.cause) for t in transitions]


def of(transitions: list[Transition], segment: str) -> list[Transition]:
    return [t for t in transitions if t.segment == segment]


# --- active_browser -------------------------------------------------------------------------


def test_the_first_event_enters_active_browser_caused_by_that_event_with_sequence_one():
    e, p = engine(), UserProfile()
    out = e.on_event("u1", p, ev(1, T0))
    assert len(out) == 1
    [enter] = out
    assert enter.user_id == "u1"
    assert enter.segment == "active_browser"
    assert enter.kind == "ENTER"
    assert enter.cause == "EVENT"
    assert enter.cause_event_id == "u1-1"
    assert enter.sequence == SEQ0 + 1  # the lifetime's base: 1000 x its first event time
    assert enter.event_time == T0
    assert enter.definitions_version == BASIC_VERSION
    assert enter.features == {"ms_since_last_event": 0.0}


def test_active_browser_exits_from_time_alone_exactly_ten_minutes_after_the_last_event():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, ev(1, T0))
    e.on_event("u1", p, ev(2, T0 + 3 * MINUTE_MS))
    lapse = T0 + 13 * MINUTE_MS
    assert e.next_change_ms(p) == lapse
    assert e.advance_to("u1", p, lapse - 1) == []
    [exit_] = e.advance_to("u1", p, lapse)
    assert (exit_.segment, exit_.kind, exit_.cause, exit_.cause_event_id) == ("active_browser", "EXIT", "TIMER", None)
    assert (exit_.event_time, exit_.sequence) == (lapse, SEQ0 + 2)
    assert e.advance_to("u1", p, lapse + HOUR_MS) == []


def test_advancing_far_past_the_lapse_still_stamps_the_exit_at_the_lapse_instant():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, ev(1, T0))
    [exit_] = e.advance_to("u1", p, T0 + 5 * HOUR_MS)
    assert exit_.event_time == T0 + 10 * MINUTE_MS
    assert p.clock_ms == T0 + 5 * HOUR_MS


def test_the_active_window_is_configurable():
    e, p = SegmentEngine(basic_definitions(active_window="1m")), UserProfile()
    e.on_event("u1", p, ev(1, T0))
    assert e.advance_to("u1", p, T0 + MINUTE_MS - 1) == []
    assert summary(e.advance_to("u1", p, T0 + MINUTE_MS)) == [("active_browser", "EXIT", T0 + MINUTE_MS, "TIMER")]


def test_an_event_after_a_lapse_emits_the_timer_exit_at_the_lapse_then_the_enter_at_the_event():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, ev(1, T0))
    out = e.on_event("u1", p, ev(2, T0 + 25 * MINUTE_MS))
    assert [(t.kind, t.event_time, t.cause, t.cause_event_id, t.sequence) for t in out] == [
        ("EXIT", T0 + 10 * MINUTE_MS, "TIMER", None, SEQ0 + 2),
        ("ENTER", T0 + 25 * MINUTE_MS, "EVENT", "u1-2", SEQ0 + 3),
    ]


def test_an_event_within_the_window_keeps_the_user_active_without_transitions():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, ev(1, T0))
    assert e.on_event("u1", p, ev(2, T0 + 10 * MINUTE_MS - 1)) == []


def test_a_late_event_does_not_move_the_recency_marks_backwards():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, ev(1, T0 + 5 * MINUTE_MS))
    assert e.on_event("u1", p, ev(2, T0)) == []
    assert p.last_event_ms == T0 + 5 * MINUTE_MS
    assert p.clock_ms == T0 + 5 * MINUTE_MS
    assert e.next_change_ms(p) == T0 + 15 * MINUTE_MS


# --- cart_holder and cart_abandoner ----------------------------------------------------------


def test_cart_holder_enters_on_add_to_cart_and_exits_on_removing_the_last_unit():
    e, p = engine(), UserProfile()
    assert summary(of(e.on_event("u1", p, add(1, T0, quantity=2)), "cart_holder")) == [
        ("cart_holder", "ENTER", T0, "EVENT")
    ]
    assert of(e.on_event("u1", p, remove(2, T0 + MINUTE_MS, quantity=1)), "cart_holder") == []
    assert p.cart_items == 1
    [exit_] = of(e.on_event("u1", p, remove(3, T0 + 2 * MINUTE_MS, quantity=1)), "cart_holder")
    assert (exit_.kind, exit_.cause_event_id, exit_.sequence) == ("EXIT", "u1-3", SEQ0 + 2)
    assert exit_.event_time == T0 + 2 * MINUTE_MS
    assert p.cart() == {}


def test_a_remove_without_quantity_removes_the_whole_line():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0, quantity=3))
    removal = e.on_event("u1", p, remove(2, T0 + MINUTE_MS, quantity=None))
    assert [t.kind for t in of(removal, "cart_holder")] == ["EXIT"]


def test_removing_a_product_not_in_the_cart_changes_nothing():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0, product="p1"))
    assert e.on_event("u1", p, remove(2, T0 + MINUTE_MS, product="other")) == []
    assert p.cart_items == 1


def test_cart_abandoner_enters_from_time_alone_thirty_quiet_minutes_after_the_last_cart_activity():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0))
    due = T0 + 30 * MINUTE_MS
    early = e.advance_to("u1", p, due - 1)
    assert summary(early) == [("active_browser", "EXIT", T0 + 10 * MINUTE_MS, "TIMER")]
    [enter] = e.advance_to("u1", p, due)
    assert (enter.segment, enter.kind, enter.cause, enter.cause_event_id) == ("cart_abandoner", "ENTER", "TIMER", None)
    assert (enter.event_time, enter.sequence) == (due, SEQ0 + 1)
    assert enter.features == {"cart_items": 1.0, "ms_since_cart_activity": float(30 * MINUTE_MS)}


def test_cart_abandoner_exits_when_a_purchase_empties_the_cart():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0))
    e.advance_to("u1", p, T0 + 40 * MINUTE_MS)
    out = e.on_event("u1", p, ev(2, T0 + 45 * MINUTE_MS, "purchase", price=10.0))
    assert {(t.segment, t.kind, t.cause, t.cause_event_id) for t in out} == {
        ("active_browser", "ENTER", "EVENT", "u1-2"),
        ("cart_holder", "EXIT", "EVENT", "u1-2"),
        ("cart_abandoner", "EXIT", "EVENT", "u1-2"),
    }
    [exit_] = of(out, "cart_abandoner")
    assert (exit_.event_time, exit_.sequence) == (T0 + 45 * MINUTE_MS, SEQ0 + 2)
    assert p.cart() == {}
    assert summary(e.advance_to("u1", p, T0 + 10 * HOUR_MS)) == [
        ("active_browser", "EXIT", T0 + 55 * MINUTE_MS, "TIMER")
    ]


def test_checkout_start_restarts_the_thirty_minutes():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0))
    e.on_event("u1", p, ev(2, T0 + 20 * MINUTE_MS, "checkout_start", price=10.0))
    assert of(e.advance_to("u1", p, T0 + 50 * MINUTE_MS - 1), "cart_abandoner") == []
    [enter] = of(e.advance_to("u1", p, T0 + 50 * MINUTE_MS), "cart_abandoner")
    assert (enter.kind, enter.event_time) == ("ENTER", T0 + 50 * MINUTE_MS)


def test_a_page_view_does_not_restart_the_cart_clock():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0))
    e.on_event("u1", p, ev(2, T0 + 20 * MINUTE_MS))
    [enter] = of(e.advance_to("u1", p, T0 + 30 * MINUTE_MS), "cart_abandoner")
    assert enter.event_time == T0 + 30 * MINUTE_MS


def test_an_event_arriving_after_the_abandon_deadline_first_emits_the_timer_enter():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0))
    out = e.on_event("u1", p, ev(2, T0 + HOUR_MS))
    assert summary(out) == [
        ("active_browser", "EXIT", T0 + 10 * MINUTE_MS, "TIMER"),
        ("cart_abandoner", "ENTER", T0 + 30 * MINUTE_MS, "TIMER"),
        ("active_browser", "ENTER", T0 + HOUR_MS, "EVENT"),
    ]


def test_an_empty_cart_never_abandons():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0))
    e.on_event("u1", p, remove(2, T0 + MINUTE_MS))
    assert of(e.advance_to("u1", p, T0 + 10 * HOUR_MS), "cart_abandoner") == []


def test_next_change_is_none_for_an_empty_cart_and_a_last_event_older_than_the_window():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, ev(1, T0))
    e.advance_to("u1", p, T0 + 11 * MINUTE_MS)
    assert e.next_change_ms(p) == T0 + RETENTION  # only the profile's cleanup is left


def test_next_change_is_none_for_a_profile_that_never_saw_an_event():
    assert engine().next_change_ms(UserProfile()) is None


def test_next_change_is_the_earliest_of_the_active_lapse_and_the_abandon_deadline():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, add(1, T0))
    assert e.next_change_ms(p) == T0 + 10 * MINUTE_MS
    e.advance_to("u1", p, T0 + 10 * MINUTE_MS)
    assert e.next_change_ms(p) == T0 + 30 * MINUTE_MS
    e.advance_to("u1", p, T0 + 30 * MINUTE_MS)
    assert e.next_change_ms(p) == T0 + RETENTION


# --- transition ids and records --------------------------------------------------------------


def test_transition_id_is_deterministic_and_differs_across_sequence_user_and_segment():
    a = transition_id("u1", "active_browser", 1)
    assert a == transition_id("u1", "active_browser", 1)
    assert uuid.UUID(a).version == 5
    assert (
        len(
            {
                a,
                transition_id("u1", "active_browser", 2),
                transition_id("u2", "active_browser", 1),
                transition_id("u1", "cart_holder", 1),
            }
        )
        == 4
    )


@given(
    user_id=st.text(min_size=1, max_size=40),
    segment=st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True),
    sequence=st.integers(1, 2**62),
)
def test_transition_id_is_the_uuid5_of_user_segment_and_sequence(user_id, segment, sequence):
    """The id published since the first release: spelled out for speed, it must stay the same."""
    name = f"{user_id}\x1f{segment}\x1f{sequence}"
    assert transition_id(user_id, segment, sequence) == str(uuid.uuid5(TRANSITION_ID_NAMESPACE, name))


def test_replaying_the_same_events_gives_the_same_transition_ids():
    events = list(generate_events(5, 3, T0, 6 * HOUR_MS))
    first, _ = replay_events(engine(), events, T0 + 6 * HOUR_MS)
    second, _ = replay_events(engine(), events, T0 + 6 * HOUR_MS)
    assert first
    assert [t.transition_id for t in first] == [t.transition_id for t in second]
    assert len({t.transition_id for t in first}) == len(first)


def test_a_transition_record_carries_its_id_reason_and_emitted_at():
    [enter] = engine().on_event("u1", UserProfile(), ev(1, T0))
    record = enter.to_record(emitted_at=T0 + 7)
    assert record["transition_id"] == transition_id("u1", "active_browser", SEQ0 + 1)
    assert record["emitted_at"] == T0 + 7
    assert record["event_time"] == T0
    assert record["reason"] == {
        "rule": "ms_since_last_event < 10m",
        "features": {"ms_since_last_event": 0.0},
        "scores": {},
        "labels": {},
        "missing": [],
        "provisional": False,
    }


def test_transition_records_encode_with_the_segment_transition_schema(catalog):
    events = list(generate_events(5, 11, T0, 6 * HOUR_MS))
    transitions, _ = replay_events(engine(), events, T0 + 6 * HOUR_MS)
    codec = catalog.codec("SegmentTransition")
    for t in transitions:
        record = t.to_record(emitted_at=T0)
        assert codec.decode(codec.encode(record)) == record


# --- properties over generated traffic -------------------------------------------------------

seeds = st.integers(0, 2**32 - 1)
user_counts = st.integers(1, 6)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, users=user_counts)
def test_per_user_and_segment_kinds_alternate_from_enter_and_sequences_rise_by_one(seed, users):
    until = T0 + DAY_MS
    events = list(generate_events(users, seed, T0, DAY_MS))
    transitions, profiles = replay_events(engine(), events, until)
    chains: dict[tuple[str, str], list[Transition]] = defaultdict(list)
    for t in transitions:
        chains[(t.user_id, t.segment)].append(t)
    for (user, segment), chain in chains.items():
        base = chain[0].sequence - 1
        assert base % 1000 == 0 and base >= T0 * 1000
        assert [t.sequence for t in chain] == list(range(base + 1, base + len(chain) + 1)), (user, segment)
        assert [t.kind for t in chain] == ["ENTER", "EXIT"] * (len(chain) // 2) + ["ENTER"] * (len(chain) % 2)
        assert profiles[user].memberships[segment].sequence == base + len(chain)
        assert profiles[user].memberships[segment].member == (chain[-1].kind == "ENTER")
        for t in chain:
            assert (t.cause == "TIMER") == (t.cause_event_id is None)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, users=user_counts)
def test_a_users_transitions_never_go_back_in_event_time(seed, users):
    events = list(generate_events(users, seed, T0, DAY_MS))
    transitions, _ = replay_events(engine(), events, T0 + DAY_MS)
    last: dict[str, int] = {}
    for t in transitions:
        assert t.event_time >= last.get(t.user_id, t.event_time)
        last[t.user_id] = t.event_time


@settings(max_examples=25, deadline=None)
@given(seed=seeds, users=user_counts)
def test_memberships_after_replay_equal_a_fresh_evaluation_at_the_final_watermark(seed, users):
    until = T0 + DAY_MS
    events = list(generate_events(users, seed, T0, DAY_MS))
    e = engine()
    _, profiles = replay_events(e, events, until)
    for profile in profiles.values():
        assert profile.clock_ms == until
        # Decided afresh, as for a user with no memberships yet: the segments that would enter.
        fresh = Evaluation(profile, until, e.catalog, profile.scores)
        entering = {name for name, _ in e.definitions.changes(fresh, {})}
        for name in e.definitions.names:
            membership = profile.memberships.get(name)
            assert (membership is not None and membership.member) == (name in entering)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, users=user_counts, data=st.data())
def test_the_transitions_do_not_depend_on_when_time_is_advanced(seed, users, data):
    duration = DAY_MS
    until = T0 + duration
    events = list(generate_events(users, seed, T0, duration))
    expected, expected_profiles = replay_events(engine(), events, until)

    # Extra advance_to calls, as the job's timers fire: at any time not beyond the next event's
    # timestamp (events are in global event-time order), for any subset of the users seen so far.
    n = len(events)
    ticks = data.draw(
        st.lists(st.tuples(st.integers(0, max(n, 1)), st.floats(0, 1), st.integers(0, 2**users - 1)), max_size=40)
    )
    by_index = defaultdict(list)
    for index, fraction, mask in ticks:
        by_index[index].append((fraction, mask))
    e = engine()
    profiles: dict[str, UserProfile] = {}
    actual: list[Transition] = []

    def tick(index: int) -> None:
        previous = events[index - 1].timestamp if index > 0 else T0
        upper = events[index].timestamp if index < n else until
        for fraction, mask in sorted(by_index.get(index, [])):
            t = previous + int(fraction * (upper - previous))
            for i, (user_id, profile) in enumerate(sorted(profiles.items())):
                if mask >> i & 1:
                    actual.extend(e.advance_to(user_id, profile, t))

    for index, event in enumerate(events):
        tick(index)
        profile = profiles.setdefault(event.user_id, UserProfile())
        actual.extend(e.on_event(event.user_id, profile, event))
    tick(n)
    for user_id, profile in profiles.items():
        actual.extend(e.advance_to(user_id, profile, until))

    def per_user(transitions: list[Transition]) -> dict[str, list[Transition]]:
        out: dict[str, list[Transition]] = defaultdict(list)
        for t in transitions:
            out[t.user_id].append(t)
        return dict(out)

    assert per_user(actual) == per_user(expected)
    # Everything but the pending timer's instant and what pruning had yet to forget: which timer
    # is pending depends on when time was advanced (a later next change keeps an earlier pending
    # timer), and so does when pruning last ran (at most once every PRUNE_EVERY_MS of event time, and a timer
    # step that changed nothing else leaves it to the next step), which only ever removes what
    # no feature can see. Pruned once more at the same clock, the profiles must be equal.
    for profile in (*profiles.values(), *expected_profiles.values()):
        profile.timer_ms = None
        profile.pruned_at_ms = -(2**62)
        prune(profile, e.config)
    assert profiles == expected_profiles


@pytest.mark.parametrize("seed", [1, 2])
def test_replay_without_a_final_watermark_leaves_time_driven_changes_pending(seed):
    events = list(generate_events(3, seed, T0, DAY_MS))
    assert events
    without, _ = replay_events(engine(), events)
    with_watermark, _ = replay_events(engine(), events, T0 + 2 * DAY_MS)
    assert len(with_watermark) > len(without)
    assert with_watermark[: len(without)] == without
    assert all(t.cause == "TIMER" for t in with_watermark[len(without) :])


def test_a_late_event_older_than_the_retention_never_moves_the_clock_back():
    """Only reachable with allowed_lateness >= retention (settings refuse it, the core copes): the
    late event's lifetime has already expired when it is applied, so it expires at the clock."""
    config = ProfileConfig(
        retention_ms=DAY_MS, horizons=(Horizon("1h", HOUR_MS, 5 * MINUTE_MS),), dedup_window_ms=MINUTE_MS
    )
    e = SegmentEngine(parse_definitions("version: v\nsegments:\n  - name: a\n    when: true\n", profile_config=config))
    p = UserProfile()
    out = e.on_event("u1", p, ev(1, T0)) + e.advance_to("u1", p, T0 + 3 * DAY_MS)
    out += e.on_event("u1", p, ev(2, T0 + 36 * HOUR_MS)) + e.advance_to("u1", p, T0 + 4 * DAY_MS)
    assert [(t.kind, t.event_time - T0, t.rule) for t in out] == [
        ("ENTER", 0, "true"),
        ("EXIT", DAY_MS, "profile_retention_expired"),
        ("ENTER", 3 * DAY_MS, "true"),
        ("EXIT", 3 * DAY_MS, "profile_retention_expired"),
    ]
    assert p.clock_ms == T0 + 4 * DAY_MS
