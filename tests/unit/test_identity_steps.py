"""The identity merge's per-user steps (SegmentEngine.step_fold_out / step_fold_in), the identify
record's checks, and the backtest's replay of identifies (jobs/backtest.py)."""

from __future__ import annotations

import json

import pytest

from jobs.backtest import EventLog, read_jsonl, run_backtest
from tests.conftest import START_MS
from tests.unit.basic_definitions import basic_definitions
from tests.unit.test_profile_properties import feature_problems
from udfs.codec import DecodeError
from udfs.events import UserEvent
from udfs.identity import MAX_ID_LENGTH, MERGED_RULE, Alias, Identify, forward_target, identify_from_record
from udfs.privacy import ERASE, UserRequest
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, MINUTE_MS
from udfs.transitions import APPLIED, DUPLICATE, LATE, MERGE, SegmentEngine, replay_events

T0 = START_MS
ANON, KNOWN = "anon-1", "known-1"


def event(event_id: str, user: str, kind: str, ts: int, **kw) -> UserEvent:
    return UserEvent(event_id, user, kind, ts, **kw)


def cart_add(event_id: str, user: str, ts: int, product: str, quantity: int, price: float) -> UserEvent:
    return event(event_id, user, "add_to_cart", ts, product_id=product, quantity=quantity, price=price)


def feed(engine: SegmentEngine, user: str, events: list[UserEvent]) -> tuple[UserProfile, list]:
    profile = UserProfile()
    out = []
    for e in events:
        out += engine.step_event(user, profile, e).transitions
    return profile, out


def test_fold_out_exits_every_segment_with_cause_merge_and_hands_the_profile_over():
    engine = SegmentEngine(basic_definitions())
    anonymous, entered = feed(
        engine, ANON, [event("a1", ANON, "page_view", T0), cart_add("a2", ANON, T0 + 1000, "p1", 2, 5.0)]
    )
    assert {t.segment for t in entered if t.kind == "ENTER"} == {"active_browser", "cart_holder"}
    identify = Identify("i1", ANON, KNOWN, T0 + MINUTE_MS)
    fold = engine.step_fold_out(ANON, anonymous, identify)
    assert fold.step.outcome == APPLIED
    exits = {t.segment: t for t in fold.step.transitions}
    assert set(exits) == {"active_browser", "cart_holder"}
    for t in exits.values():
        assert (t.kind, t.cause, t.cause_event_id, t.rule, t.event_time) == (
            "EXIT",
            MERGE,
            "i1",
            MERGED_RULE,
            T0 + MINUTE_MS,
        )
        assert t.sequence == T0 * 1000 + 2  # the lifetime's base, then the ENTER's 1
        assert t.to_record(0)["cause"] == "MERGE"
    entered_seq = {t.segment: t.sequence for t in entered}
    assert all(exits[s].sequence == entered_seq[s] + 1 for s in exits)
    assert fold.step.drop_state and anonymous.is_empty
    assert fold.folded is not None and fold.folded.memberships == {}
    assert engine.features(fold.folded, T0 + MINUTE_MS)["cart_items"] == 2


def test_fold_in_at_an_unknown_user_enters_what_the_anonymous_profile_held_cause_merge():
    engine = SegmentEngine(basic_definitions())
    anonymous, _ = feed(engine, ANON, [cart_add("a1", ANON, T0, "p1", 1, 10.0)])
    fold = engine.step_fold_out(ANON, anonymous, Identify("i1", ANON, KNOWN, T0 + 2 * MINUTE_MS))
    known = UserProfile()
    step = engine.step_fold_in(KNOWN, known, fold.folded, "i1")
    entered = {t.segment: t for t in step.transitions}
    assert set(entered) == {"active_browser", "cart_holder"}
    assert all(t.kind == "ENTER" and t.cause == MERGE and t.cause_event_id == "i1" for t in entered.values())
    assert all(t.user_id == KNOWN and t.event_time == T0 + 2 * MINUTE_MS for t in entered.values())
    # The known id's timer is registered for the next lapse: active_browser, 10 minutes after the event.
    assert step.register_timer_ms == T0 + 10 * MINUTE_MS
    assert not step.drop_state


def test_a_fold_delivered_twice_is_counted_once():
    engine = SegmentEngine(basic_definitions())
    anonymous, _ = feed(engine, ANON, [cart_add("a1", ANON, T0, "p1", 2, 10.0)])
    fold = engine.step_fold_out(ANON, anonymous, Identify("i1", ANON, KNOWN, T0 + MINUTE_MS))
    known, _ = feed(engine, KNOWN, [cart_add("k1", KNOWN, T0, "p2", 1, 1.0)])
    assert engine.step_fold_in(KNOWN, known, fold.folded, "i1").outcome == APPLIED
    again = engine.step_fold_in(KNOWN, known, fold.folded, "i1")
    assert (again.outcome, again.transitions) == (DUPLICATE, [])
    assert engine.features(known, T0 + MINUTE_MS)["cart_items"] == 3


def test_fold_in_gives_the_profile_of_both_ids_events_applied_to_one_user():
    """The merged features equal those of one profile fed the known id's events, then the
    anonymous id's (the property test does this against the oracle on random logs)."""
    engine = SegmentEngine(basic_definitions())
    anonymous_events = [
        event("a1", ANON, "product_view", T0, product_id="p1", category="shoes", session_id="s1"),
        cart_add("a2", ANON, T0 + 1000, "p1", 1, 40.0),
        event("a3", ANON, "page_view", T0 + 2000, country="FR", session_id="s1"),
    ]
    known_events = [
        event("k1", KNOWN, "purchase", T0 - DAY_MS, price=99.0, country="DE"),
        cart_add("k2", KNOWN, T0 + 500, "p2", 3, 2.5),
        event("k3", KNOWN, "page_view", T0 + 3000, session_id="s1"),
    ]
    anonymous, _ = feed(engine, ANON, anonymous_events)
    known, _ = feed(engine, KNOWN, known_events)
    fold = engine.step_fold_out(ANON, anonymous, Identify("i1", ANON, KNOWN, T0 + 4000))
    engine.step_fold_in(KNOWN, known, fold.folded, "i1")
    union, _ = feed(engine, KNOWN, known_events + anonymous_events)
    engine.step_timer(KNOWN, union, T0 + 4000)
    got, want = engine.features(known, T0 + 4000), engine.features(union, T0 + 4000)
    assert feature_problems(got, want, engine.config) == []
    # And by hand: five events in the last hour (the purchase was a day before), the purchase
    # the one order, 1 + 3 items in the cart, the latest country the anonymous id's.
    assert (got["events_1h"], got["lifetime_orders"], got["cart_items"], got["country"]) == (5, 1, 4, "FR")
    assert got["current_session_events"] == 3  # a1, a3 and k3 share session s1


def test_an_identify_of_an_id_without_events_folds_nothing_and_a_late_one_is_late():
    engine = SegmentEngine(basic_definitions())
    fold = engine.step_fold_out(ANON, UserProfile(), Identify("i1", ANON, KNOWN, T0))
    assert (fold.folded, fold.step.transitions) == (None, [])
    anonymous, _ = feed(engine, ANON, [event("a1", ANON, "page_view", T0)])
    late = engine.step_fold_out(ANON, anonymous, Identify("i2", ANON, KNOWN, T0 - 1), late_before_ms=T0)
    assert late.step.outcome == LATE and late.folded is None
    assert not anonymous.is_empty  # a late identify leaves the anonymous id as it was


def identify_record(**changes) -> dict:
    record = {
        "event_id": "i1",
        "user_id": ANON,
        "event_type": "identify",
        "timestamp": T0,
        "known_user_id": KNOWN,
        "properties": {},
    }
    return {**record, **changes}


def test_identify_records_are_checked_like_events():
    assert identify_from_record(identify_record(), T0, 0) == Identify("i1", ANON, KNOWN, T0)
    from_property = identify_record(known_user_id=None, properties={"known_user_id": KNOWN})
    assert identify_from_record(from_property, T0, 0).known_id == KNOWN
    for record, reason in [
        (identify_record(known_user_id=None), "invalid_identify"),
        (identify_record(known_user_id=" "), "invalid_identify"),
        (identify_record(known_user_id="k" * (MAX_ID_LENGTH + 1)), "invalid_identify"),
        (identify_record(known_user_id=ANON), "invalid_identify"),
        (identify_record(user_id=""), "missing_user_id"),
        (identify_record(timestamp=T0 + 1), "absurd_timestamp"),
    ]:
        with pytest.raises(DecodeError) as err:
            identify_from_record(record, T0, 0)
        assert err.value.reason == reason
        assert KNOWN not in err.value.message  # the message never carries the id


def test_an_alias_forwards_while_it_lasts_and_each_forward_extends_it():
    alias = Alias(KNOWN, T0 + DAY_MS)
    assert forward_target(alias, T0, DAY_MS) == KNOWN
    assert forward_target(alias, T0 + DAY_MS - 1, DAY_MS) == KNOWN
    assert alias.until_ms == T0 + 2 * DAY_MS - 1
    assert forward_target(alias, T0 + 2 * DAY_MS - 1, DAY_MS) is None
    assert forward_target(None, T0, DAY_MS) is None


def test_backtest_folds_at_the_identify_and_forwards_later_anonymous_events(tmp_path):
    lines = [
        {"event_id": "a1", "user_id": ANON, "event_type": "page_view", "timestamp": T0},
        {
            "event_id": "a2",
            "user_id": ANON,
            "event_type": "add_to_cart",
            "timestamp": T0 + 1000,
            "product_id": "p1",
            "quantity": 2,
            "price": 5.0,
        },
        {"event_id": "k1", "user_id": KNOWN, "event_type": "page_view", "timestamp": T0 + 2000},
        identify_record(event_id="i1", timestamp=T0 + 3000),
        {
            "event_id": "a3",
            "user_id": ANON,
            "event_type": "add_to_cart",
            "timestamp": T0 + 4000,
            "product_id": "p2",
            "quantity": 1,
            "price": 1.0,
        },
        identify_record(event_id="i2", timestamp=T0 + 5000, known_user_id="someone-else"),
        identify_record(event_id="i3", timestamp=T0 + 5000, known_user_id=None),
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = read_jsonl(path)
    assert [e.event_id for e in log.events] == ["a1", "a2", "k1", "a3"]
    assert [(position, i.event_id) for position, i in log.identifies] == [(3, "i1"), (4, "i2")]
    result = run_backtest(basic_definitions(), log, until_ms=T0 + 6000)
    anonymous = [t for t in result.transitions if t.user_id == ANON]
    assert {(t.segment, t.kind) for t in anonymous} == {
        ("active_browser", "ENTER"),
        ("cart_holder", "ENTER"),
        ("active_browser", "EXIT"),
        ("cart_holder", "EXIT"),
    }
    assert all(t.cause == MERGE for t in anonymous if t.kind == "EXIT")
    known = [t for t in result.transitions if t.user_id == KNOWN]
    assert [(t.segment, t.kind, t.cause) for t in known] == [
        ("active_browser", "ENTER", "EVENT"),
        ("cart_holder", "ENTER", "MERGE"),
    ]
    assert result.final_members["cart_holder"] == {KNOWN}
    assert result.rejected == {"identity_conflict": 1, "invalid_identify": 1}
    assert result.events_applied == 4 and result.users == 1


def test_backtest_an_identify_in_the_other_direction_takes_the_profile_back_without_a_loop():
    events = [event("a1", ANON, "page_view", T0), event("k1", KNOWN, "page_view", T0 + 1)]
    log = EventLog("log", events + [event("a2", ANON, "page_view", T0 + 5000)])
    log.identifies = [(2, Identify("i1", ANON, KNOWN, T0 + 2000)), (2, Identify("i2", KNOWN, ANON, T0 + 3000))]
    result = run_backtest(basic_definitions(), log, until_ms=T0 + 6000)
    assert result.final_members["active_browser"] == {ANON}
    assert not result.rejected


def test_feedback_records_round_trip_through_the_user_event_contract(catalog):
    """The fold and the forwarded event the job writes to its feedback topic are UserEvent v3
    records keyed (user_id) by the receiving id, and read back to the same fold and event."""
    from jobs.identity_feedback import fold_of, fold_record, forwarded_record, hops_of
    from udfs.events import event_from_record
    from udfs.identity import is_identify

    codec = catalog.codec("UserEvent")
    profile_bytes = bytes(range(256)) * 3
    record = codec.decode(codec.encode(fold_record("i1", T0, ANON, KNOWN, 2, profile_bytes)))
    assert record["user_id"] == KNOWN and is_identify(record)
    fold = fold_of(record)
    assert (fold.identify_event_id, fold.timestamp, fold.source_id, fold.hops) == ("i1", T0, ANON, 2)
    assert fold.profile_bytes == profile_bytes
    original = cart_add("a9", ANON, T0, "p1", 1, 3.0)
    forwarded = event_from_record(codec.decode(codec.encode(forwarded_record(original, KNOWN, 1))), T0, 0)
    assert forwarded.user_id == KNOWN and hops_of(forwarded) == 1 and hops_of(original) == 0
    assert (forwarded.event_id, forwarded.product_id, forwarded.quantity) == ("a9", "p1", 1)


def test_replay_events_applies_identifies_as_the_backtest_does():
    """replay_events and the backtest share the merge (udfs/identity_replay.py): the anonymous
    id's profile goes to the known id at the identify, later anonymous events follow it, and an
    identify of an id already merged elsewhere changes nothing."""
    events = [
        event("a1", ANON, "page_view", T0),
        cart_add("a2", ANON, T0 + 1000, "p1", 2, 5.0),
        event("k1", KNOWN, "page_view", T0 + 2000),
        cart_add("a3", ANON, T0 + 4000, "p2", 1, 1.0),
    ]
    identifies = [(3, Identify("i1", ANON, KNOWN, T0 + 3000)), (4, Identify("i2", ANON, "someone-else", T0 + 5000))]
    log = EventLog("log", list(events))
    log.identifies = list(identifies)
    backtest = run_backtest(basic_definitions(), log, until_ms=T0 + 6000)
    interleaved = events[:3] + [identifies[0][1], events[3], identifies[1][1]]
    replayed, profiles = replay_events(SegmentEngine(basic_definitions()), interleaved, until_ms=T0 + 6000)
    assert [t.to_record(0) for t in replayed] == [t.to_record(0) for t in backtest.transitions]
    assert {(t.user_id, t.segment, t.kind, t.cause) for t in replayed if t.cause == MERGE} >= {
        (ANON, "cart_holder", "EXIT", MERGE),
        (KNOWN, "cart_holder", "ENTER", MERGE),
    }
    # a3, sent after the merge under the anonymous id, counted for the known id: its events k1,
    # a1 and a2 (folded), the identify i1 (a fold's dedup entry) and a3 (forwarded).
    assert ANON not in profiles and len(profiles[KNOWN].seen_event_ids) == 5
    _, without_a3 = replay_events(SegmentEngine(basic_definitions()), interleaved[:4])
    assert len(without_a3[KNOWN].seen_event_ids) == 4


def test_erasing_a_merged_anonymous_id_erases_its_link_and_its_later_events_are_its_own():
    """A request names one id: erasing the anonymous id removes its alias (the link to the known
    id is personal data of both), as the job removes the keyed state `identity-alias`."""
    events = [event("a1", ANON, "page_view", T0), event("k1", KNOWN, "page_view", T0 + 1)]
    later = [event("a2", ANON, "page_view", T0 + 3000), event("a3", ANON, "page_view", T0 + 5000)]
    log = EventLog("log", events + later)
    log.identifies = [(2, Identify("i1", ANON, KNOWN, T0 + 2000))]
    merged = run_backtest(basic_definitions(), log, until_ms=T0 + 6000)
    assert merged.final_members["active_browser"] == {KNOWN}  # a2 and a3 forwarded to the known id
    log.requests = [UserRequest("r1", ANON, ERASE, T0 + 4000, "test")]
    erased = run_backtest(basic_definitions(), log, until_ms=T0 + 6000)
    assert erased.final_members["active_browser"] == {KNOWN, ANON}  # a3 is the anonymous id's own
