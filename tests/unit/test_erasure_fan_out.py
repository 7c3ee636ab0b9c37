"""An erasure reaches the anonymous ids folded into the erased user (docs/privacy.md, "A request
names one id"): the user's privacy record remembers them, and the erasure fans out to each, in the
core, in the backtest (udfs/identity_replay.py) as in the job."""

from __future__ import annotations

import msgpack
import pytest

from jobs import backtest
from tests.conftest import START_MS
from tests.unit.basic_definitions import basic_definitions
from udfs.codec import DecodeError
from udfs.identity import Identify
from udfs.privacy import (
    ERASE,
    FAN_OUT_SOURCE,
    MAX_FAN_OUT_HOPS,
    MAX_FOLDED_IDS,
    PrivacyState,
    UserRequest,
    decode_privacy,
    encode_privacy,
    fan_out_hops,
    request_from_record,
    user_hash,
)
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS
from udfs.transitions import BURIED, DUPLICATE, ERASED, ERASED_FOLDS, SegmentEngine

T0 = START_MS
LATENESS = 60_000


def ev(n: int, ts: int, user: str, kind: str = "page_view", **fields):
    from udfs.events import UserEvent

    return UserEvent(f"{user}-{n}", user, kind, ts, **fields)


def erase(ts: int, user: str, request_id: str = "r-1") -> UserRequest:
    return UserRequest(request_id, user, ERASE, ts, "test")


def merged(engine: SegmentEngine, anonymous_id: str = "anon", known_id: str = "known"):
    """`anonymous_id` browsed and was folded into `known_id` (who has a cart): the known id's
    profile and privacy record after the fold."""
    anonymous, profile, privacy = UserProfile(), UserProfile(), PrivacyState()
    engine.step_event(anonymous_id, anonymous, ev(1, T0, anonymous_id))
    engine.step_event(
        known_id, profile, ev(1, T0 + 1, known_id, "add_to_cart", product_id="p", quantity=1, price=5.0), None, privacy
    )
    fold = engine.step_fold_out(anonymous_id, anonymous, Identify("i-1", anonymous_id, known_id, T0 + 2))
    assert fold.folded is not None
    engine.step_fold_in(known_id, profile, fold.folded, "i-1", privacy, anonymous_id)
    return profile, privacy


def test_the_privacy_record_keeps_folded_ids_and_reads_the_first_layout():
    state = PrivacyState({}, T0, T0 + 1, {"a": T0 + DAY_MS, "b": T0 + 2 * DAY_MS})
    assert decode_privacy(encode_privacy(state)) == state
    assert list(decode_privacy(encode_privacy(state)).folded) == ["a", "b"]  # oldest fold first
    # The layout written before the folded ids were kept: (1, erased_at, until, consent).
    first = msgpack.packb([1, T0, T0 + 5, [["SCORING", False, T0]]])
    assert decode_privacy(first) == PrivacyState({"SCORING": (False, T0)}, T0, T0 + 5)
    with pytest.raises(DecodeError):
        decode_privacy(msgpack.packb([2, None, None, [], [["a", "not a time"]]]))
    with pytest.raises(DecodeError):
        decode_privacy(msgpack.packb([3, None, None, [], []]))
    assert not PrivacyState(folded={"a": T0}).is_empty


def test_the_record_remembers_at_most_the_latest_folds():
    state = PrivacyState()
    for n in range(MAX_FOLDED_IDS + 2):
        state.remember_fold(f"a{n}", T0 + n)
    state.remember_fold("a2", T0)  # folded again: now the latest, its alias still until T0 + 2
    assert len(state.folded) == MAX_FOLDED_IDS
    assert "a0" not in state.folded and "a1" not in state.folded
    assert list(state.folded)[-1] == "a2" and state.folded["a2"] == T0 + 2


def test_erasing_a_known_user_fans_out_to_the_ids_folded_into_them():
    engine = SegmentEngine(basic_definitions())
    profile, privacy = merged(engine)
    assert privacy.folded == {"anon": T0 + 2 + engine.config.retention_ms}
    step = engine.step_request("known", profile, privacy, erase(T0 + MINUTE_MS, "known"), LATENESS)
    assert step.outcome == ERASED and ERASED_FOLDS in step.erased and privacy.folded == {}
    (fanned,) = step.fan_out
    assert (fanned.user_id, fanned.kind, fanned.timestamp) == ("anon", ERASE, T0 + MINUTE_MS)
    assert fanned.request_id == "r-1+" + user_hash("anon")[:16]
    assert fanned.source == FAN_OUT_SOURCE + "test" and fan_out_hops(fanned) == 1
    assert request_from_record(fanned.to_record()) == fanned  # valid as any request
    # At the anonymous id it is an erasure: a tombstone buries its older events.
    anonymous, anonymous_privacy = UserProfile(), PrivacyState()
    at_anonymous = engine.step_request("anon", anonymous, anonymous_privacy, fanned, LATENESS)
    assert (at_anonymous.outcome, at_anonymous.fan_out) == (ERASED, ())
    older = engine.step_event("anon", anonymous, ev(2, T0 + 5, "anon"), None, anonymous_privacy)
    assert older.outcome == BURIED
    # A known user erased with nothing folded in fans out nothing (the control).
    other, other_privacy = UserProfile(), PrivacyState()
    engine.step_event("other", other, ev(1, T0, "other"), None, other_privacy)
    assert engine.step_request("other", other, other_privacy, erase(T0 + 1, "other"), LATENESS).fan_out == ()


def test_a_fanned_out_erasure_does_not_loop():
    engine = SegmentEngine(basic_definitions())
    # Two ids folded into each other: the erasure comes back to the first, already erased.
    profile, privacy = merged(engine, "a", "b")
    privacy.remember_fold("a", T0 + DAY_MS)
    (to_a,) = engine.step_request("b", profile, privacy, erase(T0 + MINUTE_MS, "b"), LATENESS).fan_out
    a_profile, a_privacy = UserProfile(), PrivacyState(folded={"b": T0 + DAY_MS})
    (back_to_b,) = engine.step_request("a", a_profile, a_privacy, to_a, LATENESS).fan_out
    again = engine.step_request("b", profile, privacy, back_to_b, LATENESS)
    assert (again.outcome, again.transitions, again.fan_out) == (DUPLICATE, [], ())
    # A chain as long as the aliases may be: the last erasure erases, and fans out no further.
    deep = UserRequest("r", "c", ERASE, T0, FAN_OUT_SOURCE * MAX_FAN_OUT_HOPS + "test")
    c_privacy = PrivacyState(folded={"d": T0 + DAY_MS})
    step = engine.step_request("c", UserProfile(), c_privacy, deep, LATENESS)
    assert (step.outcome, step.fan_out, c_privacy.folded) == (ERASED, (), {})


def test_folded_ids_are_forgotten_once_the_user_and_their_aliases_have_run_out():
    engine = SegmentEngine(basic_definitions())
    profile, privacy = merged(engine)
    retention = engine.config.retention_ms
    alias_until = privacy.folded["anon"]
    # The known user's profile expires (its last event at T0 + 1) before the alias does (T0 + 2).
    step = engine.step_timer("known", profile, T0 + 1 + retention, privacy)
    assert step.drop_state and privacy.folded == {"anon": alias_until}
    assert step.register_timer_ms == alias_until  # a timer to forget it, though no profile is left
    step = engine.step_timer("known", profile, alias_until, privacy)
    assert privacy.folded == {} and privacy.is_empty and step.register_timer_ms is None


def test_the_backtest_erases_the_ids_folded_into_an_erased_user():
    """anon browses and is identified as known; known is erased; an older event of anon then
    arrives (buried: its alias is erased, it has a tombstone), and a later one starts anon's own
    profile. The audit records are the job's: known's, then anon's, each once."""
    erased_at = T0 + 10 * MINUTE_MS
    events = [
        ev(1, T0, "anon", "add_to_cart", product_id="p", quantity=1, price=5.0),
        ev(1, T0 + MINUTE_MS, "known"),
        ev(2, T0 + 3 * MINUTE_MS, "anon"),  # forwarded to known
        ev(3, erased_at + MINUTE_MS, "busy"),  # moves time on, so the request comes before the next two
        ev(3, erased_at - MINUTE_MS, "anon"),  # older than the erasure, arriving after it
        ev(4, erased_at + 2 * MINUTE_MS, "anon"),  # anon's own again
    ]
    log = backtest.EventLog(
        "test",
        events,
        requests=[erase(erased_at, "known", "forget-known")],
        identifies=[(2, Identify("i-1", "anon", "known", T0 + 2 * MINUTE_MS))],
    )
    result = backtest.run_backtest(basic_definitions(), log, allowed_lateness_ms=DAY_MS, until_ms=erased_at + HOUR_MS)
    assert [(e.request_id, e.user_hash, e.erased) for e in result.erasures] == [
        (
            "forget-known",
            user_hash("known"),
            ("profile", "segment:active_browser", "segment:cart_holder", ERASED_FOLDS),
        ),
        ("forget-known+" + user_hash("anon")[:16], user_hash("anon"), ("identity_alias",)),
    ]
    assert result.erasures[1].source == FAN_OUT_SOURCE + "test"
    assert result.buried == 1
    anon_after = [
        (t.segment, t.kind, t.cause_event_id)
        for t in result.transitions
        if t.user_id == "anon" and t.event_time > erased_at
    ]
    assert ("active_browser", "ENTER", "anon-4") in anon_after
    # Without the fan-out anon's older event would go to known and be buried there too; its later
    # one would count for known: the control is that known has no transition after the erasure.
    assert not [t for t in result.transitions if t.user_id == "known" and t.event_time > erased_at]
