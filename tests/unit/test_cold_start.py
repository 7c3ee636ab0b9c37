"""Cold-start (provisional) segments (docs/definitions.md "Cold-start segments"): entered from
context alone, left by the file's cold_start rule at the exact instant, each transition marked
provisional; the same transitions as the condition written out by hand; the file's errors; the
backtest's account of how long users stay provisional, against figures worked out by hand."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from jobs.backtest import EventLog, run_backtest
from tests.conftest import START_MS
from tests.unit.profile_oracle import Advance
from tests.unit.test_profile_properties import DEFAULT_40D, DEFAULT_SCALE, event_logs
from udfs.definitions import DefinitionError, parse_definitions
from udfs.events import UserEvent
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS
from udfs.transitions import SegmentEngine, replay_events

A = START_MS - START_MS % DAY_MS
SEQ0 = A * 1000

ENDS = "lifetime_orders >= 1 or ms_since_first_seen >= 1d"
PAID_MOBILE = 'device == "mobile" and utm_medium in ["cpc", "paid_social"] and sessions_30d == 1'
NEWSLETTER = 'first_touch_source == "newsletter"'
COLD_START = f"""version: cold-1
cold_start:
  ends_when: {ENDS}
segments:
  - name: new_paid_mobile
    provisional: true
    when: {PAID_MOBILE}
  - name: new_from_newsletter
    provisional: true
    when: {NEWSLETTER}
  - name: browsing
    when: ms_since_last_event < 10m
"""
# The same segments written out as the rule says, without `provisional`.
WRITTEN_OUT = f"""version: cold-1
segments:
  - name: new_paid_mobile
    when: ({PAID_MOBILE}) and not ({ENDS})
  - name: new_from_newsletter
    when: ({NEWSLETTER}) and not ({ENDS})
  - name: browsing
    when: ms_since_last_event < 10m
"""


def ev(n: int, ts: int, kind: str = "page_view", user: str = "u1", **fields) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, kind, ts, **fields)


def brief(transitions) -> list[tuple]:
    return [(t.user_id, t.segment, t.kind, t.event_time - A, t.cause, t.provisional) for t in transitions]


PAID = {"device": "mobile", "utm_source": "google", "utm_medium": "cpc", "utm_campaign": "spring"}


def test_a_paid_mobile_newcomer_enters_at_the_first_event_and_leaves_a_day_after_by_timer_marked_provisional():
    events = [ev(1, A, **PAID), ev(2, A + 5 * MINUTE_MS, device="mobile")]
    out, _ = replay_events(SegmentEngine(parse_definitions(COLD_START)), events, until_ms=A + 2 * DAY_MS)
    assert brief(out) == [
        ("u1", "new_paid_mobile", "ENTER", 0, "EVENT", True),
        ("u1", "browsing", "ENTER", 0, "EVENT", False),
        ("u1", "browsing", "EXIT", 15 * MINUTE_MS, "TIMER", False),
        ("u1", "new_paid_mobile", "EXIT", DAY_MS, "TIMER", True),  # ms_since_first_seen >= 1d, to the ms
    ]
    left = out[-1]
    assert left.rule == (
        'not ((device == "mobile" and utm_medium in ["cpc", "paid_social"] and sessions_30d == 1) '
        "and not (lifetime_orders >= 1 or ms_since_first_seen >= 1d))"
    )
    assert left.features == {"sessions_30d": 1.0, "lifetime_orders": 0.0, "ms_since_first_seen": float(DAY_MS)}
    assert left.labels == {"device": "mobile", "utm_medium": "cpc"}
    assert left.to_record(0)["reason"]["provisional"] is True


def test_a_purchase_ends_the_cold_start_and_a_second_session_the_first_session_segment():
    events = [
        ev(1, A, **PAID),
        ev(2, A + 2 * HOUR_MS, "page_view", user="u2", device="desktop", utm_source="newsletter", utm_medium="email"),
        ev(3, A + 3 * HOUR_MS, "purchase", user="u2", price=30.0),
        ev(4, A + 4 * HOUR_MS),  # u1's second session (30 minutes of gap)
    ]
    out, _ = replay_events(SegmentEngine(parse_definitions(COLD_START)), events, until_ms=A + 5 * HOUR_MS)
    provisional = [b for b in brief(out) if b[1] != "browsing"]
    assert provisional == [
        ("u1", "new_paid_mobile", "ENTER", 0, "EVENT", True),
        ("u2", "new_from_newsletter", "ENTER", 2 * HOUR_MS, "EVENT", True),
        ("u2", "new_from_newsletter", "EXIT", 3 * HOUR_MS, "EVENT", True),
        ("u1", "new_paid_mobile", "EXIT", 4 * HOUR_MS, "EVENT", True),
    ]


def test_a_provisional_segment_has_the_transitions_of_its_condition_written_out(catalog):
    """The rule of docs/definitions.md, on generated traffic (which carries context): the same
    transitions, rules and features as `(when) and not (ends_when)` written by hand, and only the
    provisional mark differs."""
    from udfs.shoppers import generate_events

    events = list(generate_events(120, 5, A, 2 * DAY_MS))
    until = A + 3 * DAY_MS
    cold, _ = replay_events(SegmentEngine(parse_definitions(COLD_START)), events, until_ms=until)
    written, _ = replay_events(SegmentEngine(parse_definitions(WRITTEN_OUT)), events, until_ms=until)
    assert {t.segment for t in cold if t.provisional} == {"new_paid_mobile", "new_from_newsletter"}
    assert all(t.provisional == (t.segment != "browsing") for t in cold)
    assert not any(t.provisional for t in written)
    records = [t.to_record(0) for t in cold]
    for record in records:
        record["reason"]["provisional"] = False
    assert records == [t.to_record(0) for t in written]


def test_the_retention_exit_of_a_provisional_segment_is_provisional_too():
    text = COLD_START.replace("ms_since_first_seen >= 1d", "ms_since_first_seen >= 1000d")
    definitions = parse_definitions(text)
    engine = SegmentEngine(definitions)
    profile = UserProfile()
    engine.on_event("u1", profile, ev(1, A, device="mobile", utm_source="newsletter"))
    out = engine.advance_to("u1", profile, A + definitions.catalog.config.retention_ms)
    assert [(t.segment, t.kind, t.rule, t.provisional) for t in out if t.segment != "browsing"] == [
        ("new_from_newsletter", "EXIT", "profile_retention_expired", True)
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("cold_start:\n  ends_when: lifetime_orders >= 1 or ms_since_first_seen >= 1d\n", ""),
            "needs the file's cold_start",
        ),
        (("provisional: true", "provisional: yes please"), "provisional must be true or false"),
        (("ends_when:", "ending:"), "unknown key 'ending' in cold_start"),
        (("ms_since_first_seen >= 1d", "ms_since_first_seen >= 1 day"), r"cold\.yaml:3:\d+: "),
        (
            ("    when: first_touch_source", "    enter: first_touch_source"),
            "a provisional segment is given with `when`",
        ),
    ],
)
def test_a_cold_start_mistake_is_a_definition_error(change, message):
    with pytest.raises(DefinitionError, match=message):
        parse_definitions(COLD_START.replace(*change), source="cold.yaml")


def test_a_provisional_false_segment_is_an_ordinary_one():
    definitions = parse_definitions(COLD_START.replace("provisional: true", "provisional: false", 1))
    segment = definitions.segments["new_paid_mobile"]
    assert not segment.provisional and "ms_since_first_seen" not in segment.enter.text


def test_the_backtest_tells_how_long_users_stay_provisional():
    """Worked out by hand: u1 is provisional from A to A + 1d (in both segments until A + 1h, when
    the newsletter's medium replaces the paid one, then in new_from_newsletter: counted once); u2
    from A + 2h to A + 3h (a purchase); u3 from A + 20h, still at the end (A + 30h); u4 never (a
    direct visit)."""
    events = [
        ev(1, A, user="u1", device="mobile", utm_source="newsletter", utm_medium="cpc"),
        ev(2, A + HOUR_MS, user="u1", utm_source="newsletter", utm_medium="email"),
        ev(3, A + 2 * HOUR_MS, user="u2", utm_source="newsletter"),
        ev(4, A + 3 * HOUR_MS, "purchase", user="u2", price=1.0),
        ev(5, A + 20 * HOUR_MS, user="u3", utm_source="newsletter"),
        ev(6, A + 20 * HOUR_MS, user="u4"),
    ]
    result = run_backtest(parse_definitions(COLD_START), EventLog("hand-made", events), until_ms=A + 30 * HOUR_MS)
    p = result.provisional
    assert (p.users, p.left, p.still) == (3, 2, 1)
    assert (p.median_ms, p.max_ms) == ((DAY_MS + HOUR_MS) / 2, DAY_MS)
    assert p.p90_ms == pytest.approx(HOUR_MS + 0.9 * (DAY_MS - HOUR_MS))
    from jobs.backtest import summary_lines

    assert "provisional (cold start): 3 users; 2 left after a median 12.5h, p90 21.7h, max 1.0d; 1 still" in (
        "\n".join(summary_lines(result))
    )


TIMED_ENDS = "ms_since_first_seen >= 1h or lifetime_orders >= 1 or count_page_view_24h >= 3"
ACTIVE_FROM_CAMPAIGN = 'ms_since_last_event < 10m and utm_medium in ["cpc", "email"]'
TIMED = f"""version: cold-2
cold_start:
  ends_when: {TIMED_ENDS}
segments:
  - name: new_and_active
    provisional: true
    when: {ACTIVE_FROM_CAMPAIGN}
  - name: new_on_mobile
    provisional: true
    when: device == "mobile"
"""
TIMED_WRITTEN_OUT = f"""version: cold-2
segments:
  - name: new_and_active
    when: ({ACTIVE_FROM_CAMPAIGN}) and not ({TIMED_ENDS})
  - name: new_on_mobile
    when: (device == "mobile") and not ({TIMED_ENDS})
"""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=event_logs(DEFAULT_SCALE, DEFAULT_40D))
def test_a_provisional_segments_timers_are_those_of_its_condition_written_out(steps):
    """Random arrival-ordered logs with resends, out-of-order events and timer advances (the
    profile property tests' logs, with context): the provisional segment's narrower next-change
    instants (docs/definitions.md) miss no change the general `and` / `not` would catch."""
    out = []
    for text in (TIMED, TIMED_WRITTEN_OUT):
        engine = SegmentEngine(parse_definitions(text, profile_config=DEFAULT_40D))
        profile = UserProfile()
        got = []
        for step in steps:
            if isinstance(step, Advance):
                got += engine.advance_to("u1", profile, step.time_ms)
            else:
                got += engine.on_event("u1", profile, step)
        out.append([(t.segment, t.kind, t.event_time, t.cause, t.rule, t.features, t.labels) for t in got])
    assert out[0] == out[1]
