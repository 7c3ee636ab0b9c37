"""Erasure and consent in the core (udfs/privacy.py, SegmentEngine.step_request): what a request
does to a user's transitions and state, and that the backtest replays requests as the core does."""

from __future__ import annotations

import pytest

from jobs import backtest
from tests.conftest import START_MS
from tests.unit.basic_definitions import basic_definitions
from udfs.codec import DecodeError, SchemaCatalog
from udfs.definitions import ModelOutput, parse_definitions
from udfs.events import UserEvent
from udfs.privacy import (
    CONSENT,
    CONSENT_RULE,
    ERASE,
    ERASURE_RULE,
    PERSONALISATION,
    SCORING,
    SCORING_CONSENT_RULE,
    SEGMENTATION,
    PrivacyState,
    UserRequest,
    decode_privacy,
    encode_privacy,
    request_from_record,
    user_hash,
)
from udfs.profile import UserProfile
from udfs.profile_config import HOUR_MS, MINUTE_MS
from udfs.shoppers import generate_events
from udfs.transitions import BURIED, WITHHELD, SegmentEngine

T0 = START_MS
LATENESS = 60_000


def ev(n: int, ts: int, kind: str = "page_view", user: str = "u1", **fields) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, kind, ts, **fields)


def erase(ts: int, user: str = "u1") -> UserRequest:
    return UserRequest(f"r-{ts}", user, ERASE, ts, "test")


def consent(ts: int, purpose: str, granted: bool, user: str = "u1") -> UserRequest:
    return UserRequest(f"c-{ts}", user, CONSENT, ts, "test", purpose, granted)


def in_cart(user_engine: SegmentEngine, profile: UserProfile, privacy: PrivacyState) -> list:
    """A user in active_browser and cart_holder (the basic definitions)."""
    step = user_engine.step_event(
        "u1", profile, ev(1, T0, "add_to_cart", product_id="p", quantity=1, price=5.0), privacy=privacy
    )
    return step.transitions


def test_erasure_exits_every_segment_with_cause_erasure_and_leaves_only_a_bounded_tombstone():
    engine, profile, privacy = SegmentEngine(basic_definitions()), UserProfile(), PrivacyState()
    entered = in_cart(engine, profile, privacy)
    assert {(t.segment, t.kind) for t in entered} == {("active_browser", "ENTER"), ("cart_holder", "ENTER")}
    pending = profile.timer_ms
    step = engine.step_request("u1", profile, privacy, erase(T0 + MINUTE_MS), LATENESS)
    exits = {t.segment: t for t in step.transitions}
    assert set(exits) == {"active_browser", "cart_holder"}
    for t in exits.values():
        assert (t.kind, t.cause, t.rule, t.event_time, t.cause_event_id) == (
            "EXIT",
            "ERASURE",
            ERASURE_RULE,
            T0 + MINUTE_MS,
            f"r-{T0 + MINUTE_MS}",
        )
        assert t.features == {} and t.scores == {}
        entry = next(e for e in entered if e.segment == t.segment)
        assert t.sequence == entry.sequence + 1
    assert step.drop_state and profile.is_empty
    assert step.delete_timer_ms == pending
    assert step.register_timer_ms == T0 + MINUTE_MS + LATENESS
    assert set(step.erased) == {"profile", "segment:active_browser", "segment:cart_holder"}
    assert (privacy.erased_at_ms, privacy.consent) == (T0 + MINUTE_MS, {})
    # The tombstone goes when its timer fires; nothing of the user is left then.
    engine.step_timer("u1", profile, T0 + MINUTE_MS + LATENESS - 1, privacy)
    assert not privacy.is_empty
    assert engine.step_timer("u1", profile, T0 + MINUTE_MS + LATENESS, privacy).drop_state
    assert privacy.is_empty


def test_events_before_the_erasure_arriving_after_it_are_not_resurrected():
    engine, profile, privacy = SegmentEngine(basic_definitions()), UserProfile(), PrivacyState()
    in_cart(engine, profile, privacy)
    engine.step_request("u1", profile, privacy, erase(T0 + MINUTE_MS), LATENESS)
    late = engine.step_event("u1", profile, ev(2, T0 + MINUTE_MS - 1, "add_to_cart", product_id="p"), privacy=privacy)
    assert (late.outcome, late.transitions, late.drop_state) == (BURIED, [], True)
    assert profile.is_empty
    # An event at or after the request's instant is the user coming back: a new profile.
    back = engine.step_event("u1", profile, ev(3, T0 + MINUTE_MS), privacy=privacy)
    [enter] = back.transitions
    assert (enter.segment, enter.kind) == ("active_browser", "ENTER")
    assert enter.sequence > (T0 + MINUTE_MS) * 1000  # a new lifetime: sequences above the old ones


def test_erasing_an_unknown_user_erases_nothing_and_says_so():
    engine, profile, privacy = SegmentEngine(basic_definitions()), UserProfile(), PrivacyState()
    step = engine.step_request("u1", profile, privacy, erase(T0), LATENESS)
    assert (step.transitions, step.erased, step.drop_state) == ([], (), True)


def test_an_erasure_tells_the_view_to_delete_every_sequence_of_the_erased_lifetime_and_none_of_a_return():
    """The erasure marker's bound (Step.erase_view_up_to): at or above every sequence the user had,
    held segment or not (a user in no segment emits no EXIT, yet the view keeps their sequences),
    and below every sequence of a return at or after the request."""
    engine, profile, privacy = SegmentEngine(basic_definitions()), UserProfile(), PrivacyState()
    entered = in_cart(engine, profile, privacy)
    # Ten minutes later active_browser has lapsed; the user is still in cart_holder.
    engine.step_timer("u1", profile, T0 + 20 * MINUTE_MS, privacy)
    step = engine.step_request("u1", profile, privacy, erase(T0 + 25 * MINUTE_MS), LATENESS)
    emitted = [t.sequence for t in entered + step.transitions]
    assert step.erase_view_up_to is not None and step.erase_view_up_to >= max(emitted)
    back = engine.step_event("u1", profile, ev(3, T0 + 25 * MINUTE_MS), privacy=privacy)
    assert back.transitions and all(t.sequence > step.erase_view_up_to for t in back.transitions)
    # A user in no segment, and one the job holds nothing of: a marker all the same.
    quiet, quiet_privacy = UserProfile(), PrivacyState()
    engine.step_event("u2", quiet, ev(1, T0, "page_view", user="u2"), privacy=quiet_privacy)
    engine.step_timer("u2", quiet, T0 + 20 * MINUTE_MS, quiet_privacy)  # active_browser lapsed
    assert not any(m.member for m in quiet.memberships.values())
    quiet_step = engine.step_request("u2", quiet, quiet_privacy, erase(T0 + HOUR_MS, "u2"), LATENESS)
    assert quiet_step.transitions == [] and quiet_step.erase_view_up_to == (T0 + HOUR_MS) * 1000
    unknown = engine.step_request("u3", UserProfile(), PrivacyState(), erase(T0, "u3"), LATENESS)
    assert unknown.erase_view_up_to == T0 * 1000
    # A withdrawn consent to segmentation ends the lifetime too: the view keeps nothing but the
    # choice (in the job's state). Other consent changes go by their EXITs alone.
    withdrawn = engine.step_request("u4", UserProfile(), PrivacyState(), consent(T0, SEGMENTATION, False, "u4"), 0)
    assert withdrawn.erase_view_up_to == T0 * 1000
    scoring_only = engine.step_request("u4", UserProfile(), PrivacyState(), consent(T0, SCORING, False, "u4"), 0)
    assert scoring_only.erase_view_up_to is None


def test_time_driven_changes_before_the_request_come_first_as_for_an_event():
    """active_browser lapses 10 minutes after the event and cart_abandoner starts 30 minutes after
    it: an erasure an hour later first emits those TIMER transitions (as the job's timers would
    have), then the ERASURE exits of the two cart segments."""
    engine, profile, privacy = SegmentEngine(basic_definitions()), UserProfile(), PrivacyState()
    in_cart(engine, profile, privacy)
    step = engine.step_request("u1", profile, privacy, erase(T0 + HOUR_MS), LATENESS)
    assert [(t.segment, t.kind, t.cause, t.event_time) for t in step.transitions] == [
        ("active_browser", "EXIT", "TIMER", T0 + 10 * MINUTE_MS),
        ("cart_abandoner", "ENTER", "TIMER", T0 + 30 * MINUTE_MS),
        ("cart_holder", "EXIT", "ERASURE", T0 + HOUR_MS),
        ("cart_abandoner", "EXIT", "ERASURE", T0 + HOUR_MS),
    ]


def test_withdrawn_segmentation_consent_exits_keeps_only_the_consent_record_and_drops_events():
    engine, profile, privacy = SegmentEngine(basic_definitions()), UserProfile(), PrivacyState()
    in_cart(engine, profile, privacy)
    step = engine.step_request("u1", profile, privacy, consent(T0 + 1, SEGMENTATION, False), LATENESS)
    assert {(t.segment, t.kind, t.cause, t.rule) for t in step.transitions} == {
        ("active_browser", "EXIT", "CONSENT", CONSENT_RULE),
        ("cart_holder", "EXIT", "CONSENT", CONSENT_RULE),
    }
    assert step.drop_state and profile.is_empty
    assert privacy.consent == {SEGMENTATION: (False, T0 + 1)} and privacy.erased_at_ms is None
    dropped = engine.step_event("u1", profile, ev(2, T0 + 2), privacy=privacy)
    assert (dropped.outcome, dropped.transitions, profile.is_empty) == (WITHHELD, [], True)
    # Given again: the next event starts a new profile; the record equals the default, so it goes.
    engine.step_request("u1", profile, privacy, consent(T0 + 3, SEGMENTATION, True), LATENESS)
    assert privacy.is_empty
    [enter] = engine.step_event("u1", profile, ev(4, T0 + 4), privacy=privacy).transitions
    assert (enter.segment, enter.kind, enter.cause) == ("active_browser", "ENTER", "EVENT")


def test_without_a_consent_record_the_default_decides():
    engine = SegmentEngine(basic_definitions())
    engine.consent_default = False
    profile, privacy = UserProfile(), PrivacyState()
    assert engine.step_event("u1", profile, ev(1, T0), privacy=privacy).outcome == WITHHELD
    assert engine.step_event("u1", profile, ev(1, T0)).outcome == WITHHELD  # runners without a record
    engine.step_request("u1", profile, privacy, consent(T0 + 1, SEGMENTATION, True), LATENESS)
    assert privacy.consent == {SEGMENTATION: (True, T0 + 1)}
    [enter] = engine.step_event("u1", profile, ev(2, T0 + 2), privacy=privacy).transitions
    assert enter.segment == "active_browser"


def scored_engine(calls: list[int]) -> SegmentEngine:
    definitions = parse_definitions(
        "version: v\nsegments:\n  - name: likely\n    enter: score.propensity > 0.7\n    exit: score.propensity < 0.5\n"
        "  - name: seen\n    when: ms_since_last_event < 1h\n",
        models={"propensity": ModelOutput("propensity")},
    )

    def scorer(profile, now, read):
        calls.append(now)
        return {"propensity": 0.9}

    return SegmentEngine(definitions, "p:1", scorer)


def test_without_scoring_consent_no_model_runs_and_model_segments_see_scores_missing():
    calls: list[int] = []
    engine, profile, privacy = scored_engine(calls), UserProfile(), PrivacyState()
    entered = engine.step_event("u1", profile, ev(1, T0), privacy=privacy).transitions
    assert {t.segment for t in entered} == {"likely", "seen"} and calls == [T0]
    step = engine.step_request("u1", profile, privacy, consent(T0 + 5, SCORING, False), LATENESS)
    [left] = step.transitions
    # A missing score meets no exit condition: the hysteresis alone would keep the user in.
    assert (left.segment, left.kind, left.cause, left.event_time, left.rule) == (
        "likely",
        "EXIT",
        "CONSENT",
        T0 + 5,
        SCORING_CONSENT_RULE,
    )
    assert profile.scores == {} and not step.drop_state
    engine.step_event("u1", profile, ev(2, T0 + 6), privacy=privacy)
    assert calls == [T0] and profile.scores == {}
    step = engine.step_request("u1", profile, privacy, consent(T0 + 7, SCORING, True), LATENESS)
    [back] = step.transitions
    assert (back.segment, back.kind, back.cause) == ("likely", "ENTER", "CONSENT")
    assert calls == [T0, T0 + 7]


def test_personalisation_consent_is_recorded_and_changes_no_segment():
    engine, profile, privacy = SegmentEngine(basic_definitions()), UserProfile(), PrivacyState()
    in_cart(engine, profile, privacy)
    step = engine.step_request("u1", profile, privacy, consent(T0 + 1, PERSONALISATION, False), LATENESS)
    assert step.transitions == [] and not step.drop_state
    assert privacy.consent == {PERSONALISATION: (False, T0 + 1)}


def test_the_privacy_record_round_trips_and_damage_is_an_error():
    state = PrivacyState({SCORING: (False, T0)}, T0 + 1, T0 + 2)
    assert decode_privacy(encode_privacy(state)) == state
    assert decode_privacy(None) == PrivacyState()
    with pytest.raises(DecodeError):
        decode_privacy(b"\x93\x01")
    with pytest.raises(DecodeError):
        decode_privacy(encode_privacy(state)[:-3])


def test_requests_are_validated_and_the_audit_never_holds_the_id():
    codec = SchemaCatalog().codec("UserRequest")
    good = consent(T0, SCORING, False)
    assert request_from_record(codec.decode(codec.encode(good.to_record()))) == good
    with pytest.raises(DecodeError, match="purpose"):
        request_from_record({**good.to_record(), "purpose": None})
    with pytest.raises(DecodeError) as err:
        request_from_record({**erase(T0).to_record(), "user_id": ""})
    assert err.value.reason == "missing_user_id"
    assert user_hash("u1") != "u1" and len(user_hash("u1")) == 64


def test_the_backtest_replays_requests_as_the_core_does():
    """Generated traffic with an erasure and a consent withdrawal mid-log: the backtest's
    transitions equal a per-user replay of the same records through the core, and the erased
    user's later-arriving older events are buried."""
    events = list(generate_events(users=12, seed=7, start_ms=T0, duration_ms=48 * HOUR_MS))
    users = sorted({e.user_id for e in events})
    middle = events[len(events) // 2].timestamp
    requests = [erase(middle, users[0]), consent(middle, SEGMENTATION, False, users[1])]
    # One of the erased user's events from before the erasure arrives after it.
    buried = ev(99, middle - 1, user=users[0])
    log = backtest.EventLog("test", [*events, buried], requests=requests)
    result = backtest.run_backtest(basic_definitions(), log, allowed_lateness_ms=10 * 24 * HOUR_MS)

    engine = SegmentEngine(basic_definitions())
    profiles: dict[str, UserProfile] = {}
    privacy: dict[str, PrivacyState] = {}
    expected = []
    for record in backtest.in_arrival_order(log):
        profile = profiles.setdefault(record.user_id, UserProfile())
        state = privacy.setdefault(record.user_id, PrivacyState())
        if isinstance(record, UserRequest):
            expected += engine.step_request(record.user_id, profile, state, record, 10 * 24 * HOUR_MS).transitions
        else:
            expected += engine.step_event(record.user_id, profile, record, privacy=state).transitions
    for user_id, profile in profiles.items():
        expected += engine.step_timer(user_id, profile, result.until_ms, privacy[user_id]).transitions
    assert sorted(t.to_record(0).items().__repr__() for t in result.transitions) == sorted(
        t.to_record(0).items().__repr__() for t in expected
    )
    causes = {(t.user_id, t.cause) for t in result.transitions}
    assert (users[0], "ERASURE") in causes and (users[1], "CONSENT") in causes
    assert result.buried == 1
    assert not any(t.user_id == users[1] and t.event_time > middle for t in result.transitions)


def test_privacy_settings_the_topics_the_project_creates_and_forget_without_a_topic():
    from jobs.privacy_requests import erase_request, produce_request
    from jobs.settings import JobSettings, SettingsError

    plain = JobSettings()
    assert not plain.privacy_requests and set(plain.topic_partitions(3)) == {
        "shopper-events",
        "segment-transitions",
        "segment-dead-letters",
    }
    assert plain.topic_configs() == {"segment-dead-letters": {"retention.ms": str(7 * 24 * HOUR_MS)}}
    on = JobSettings(requests_topic="requests", dead_letter_retention_ms=HOUR_MS)
    assert (
        on.privacy_requests and on.topic_partitions(3)["requests"] == 3 and on.topic_partitions(3)["erasure-audit"] == 1
    )
    assert on.topic_configs()["segment-dead-letters"]["retention.ms"] == str(HOUR_MS)
    assert on.topic_configs()["erasure-audit"] == {"retention.ms": "-1"}  # the audit trail is kept
    merging = JobSettings(identity_topic="identity", identity_retention_ms=HOUR_MS)
    assert merging.topic_configs()["identity"] == {"retention.ms": str(HOUR_MS)}
    assert merging.topic_partitions(3)["identity"] == 3
    assert JobSettings(consent_default="withheld").privacy_requests
    with pytest.raises(SettingsError, match="consent_default"):
        JobSettings(consent_default="maybe")
    with pytest.raises(ValueError, match="requests_topic is not set"):
        produce_request(plain, erase_request("u1"))


def test_an_identity_fold_is_held_to_the_known_users_privacy_as_an_event_is():
    """A fold brings the anonymous id's history to the known user: it must not get past what
    the known user asked (a withdrawn consent, an erasure's tombstone, no scoring)."""
    from udfs.identity import Identify

    def folded_cart(engine: SegmentEngine, at: int) -> UserProfile:
        anonymous = UserProfile()
        engine.step_event("anon", anonymous, ev(1, at, "add_to_cart", user="anon", product_id="p", quantity=1, price=5))
        fold = engine.step_fold_out("anon", anonymous, Identify(f"i-{at}", "anon", "u1", at + 1))
        assert fold.folded is not None
        return fold.folded

    engine = SegmentEngine(basic_definitions())
    # No consent to segmentation at the known id: the fold is withheld, nothing is kept or entered.
    profile, privacy = UserProfile(), PrivacyState()
    engine.step_request("u1", profile, privacy, consent(T0, SEGMENTATION, False), LATENESS)
    step = engine.step_fold_in("u1", profile, folded_cart(engine, T0 + 10), "i-1", privacy)
    assert (step.outcome, step.transitions, profile.is_empty) == (WITHHELD, [], True)
    # Erased after the anonymous history: a fold of it arriving later is buried.
    profile, privacy = UserProfile(), PrivacyState()
    engine.step_event("u1", profile, ev(2, T0), privacy=privacy)
    folded = folded_cart(engine, T0 + 10)
    engine.step_request("u1", profile, privacy, erase(T0 + 20), LATENESS)
    step = engine.step_fold_in("u1", profile, folded, "i-2", privacy)
    assert (step.outcome, step.transitions, profile.is_empty) == (BURIED, [], True)
    # With consent, the same fold enters the known user (the control: the two above can fail).
    profile, privacy = UserProfile(), PrivacyState()
    step = engine.step_fold_in("u1", profile, folded_cart(engine, T0 + 10), "i-3", privacy)
    assert {t.segment for t in step.transitions} == {"active_browser", "cart_holder"}
    # No consent to scoring at the known id: the fold is merged and evaluated, no model runs.
    calls: list[int] = []
    scored = scored_engine(calls)
    profile, privacy = UserProfile(), PrivacyState()
    scored.step_request("u1", profile, privacy, consent(T0, SCORING, False), LATENESS)
    anonymous = UserProfile()
    scored.step_event("anon", anonymous, ev(3, T0 + 10, user="anon"))
    calls.clear()
    fold = scored.step_fold_out("anon", anonymous, Identify("i-4", "anon", "u1", T0 + 11))
    assert fold.folded is not None
    step = scored.step_fold_in("u1", profile, fold.folded, "i-4", privacy)
    assert [t.segment for t in step.transitions] == ["seen"] and calls == [] and profile.scores == {}
