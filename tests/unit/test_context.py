"""Context features (docs/features.md "Context"): local hour and weekday against the standard
library's datetime, with their lapses checked minute by minute across summer-time changes, a
half-hour zone and a day that a zone skipped; segments on them through the engine, entered and left
by timers at the local boundaries; the device classes; the text checks of the compiler."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from udfs.context import DAY_S, HOUR_S, device_class, local_hour, local_weekday, next_boundary_ms
from udfs.definitions import DefinitionError, parse_definitions
from udfs.events import UserEvent
from udfs.profile import UserProfile
from udfs.transitions import SegmentEngine

MINUTE_MS = 60_000
NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def ms(text: str) -> int:
    """An ISO instant with its offset, in ms since the epoch."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def wall(t: int, zone: str | None) -> datetime:
    return datetime.fromtimestamp(t // 1000, UTC if zone is None else ZoneInfo(zone))


# (zone, an instant within a day of one of its offset changes)
CHANGES = [
    ("America/New_York", ms("2026-03-08T07:00:00+00:00")),  # 02:00 -> 03:00
    ("America/New_York", ms("2026-11-01T06:00:00+00:00")),  # 02:00 -> 01:00
    ("Australia/Lord_Howe", ms("2026-04-04T15:00:00+00:00")),  # 02:00 -> 01:30 (half an hour)
    ("Australia/Lord_Howe", ms("2026-10-03T15:30:00+00:00")),  # 02:00 -> 02:30
    ("America/Sao_Paulo", ms("2018-11-04T03:00:00+00:00")),  # midnight -> 01:00
    ("America/Sao_Paulo", ms("2018-02-18T02:00:00+00:00")),  # midnight -> 23:00 the day before
    ("Pacific/Apia", ms("2011-12-30T10:00:00+00:00")),  # 30 December 2011 skipped
    ("Asia/Kolkata", ms("2026-06-01T00:00:00+00:00")),  # +05:30, no change
    (None, ms("2026-06-01T00:00:00+00:00")),  # UTC
]


def value(t: int, zone: str | None, period_s: int):
    local = wall(t, zone)
    return local.hour if period_s == HOUR_S else NAMES[local.weekday()]


@pytest.mark.parametrize("zone, around", CHANGES, ids=lambda x: str(x))
@pytest.mark.parametrize("period_s, every_ms", [(HOUR_S, 7 * MINUTE_MS + 13), (DAY_S, 97 * MINUTE_MS + 7)])
def test_local_time_and_its_next_change_against_datetime_minute_by_minute(zone, around, period_s, every_ms):
    for t in range(around - 36 * 3600_000, around + 36 * 3600_000, every_ms):
        read = local_hour(t, zone) if period_s == HOUR_S else local_weekday(t, zone)
        now = value(t, zone, period_s)
        assert read == now, wall(t, zone)
        due = next_boundary_ms(t, zone, period_s)
        assert t < due <= t + period_s * 1000 + 3600_000, wall(t, zone)  # a period, and a change's shift
        # Nothing changes before it (local time changes only at whole minutes, or seconds for
        # the offset changes themselves) ...
        first_minute = t - t % MINUTE_MS + MINUTE_MS
        for instant in [*range(first_minute, due, MINUTE_MS), due - 1]:
            assert value(instant, zone, period_s) == now, (wall(t, zone), wall(instant, zone))
        # ... and at it the value changes, or the zone's offset does (then it is read again).
        offset_changes = wall(due, zone).utcoffset() != wall(due - 1000, zone).utcoffset()
        assert value(due, zone, period_s) != now or offset_changes, (wall(t, zone), wall(due, zone))


def event(n: int, t: int, **context) -> UserEvent:
    return UserEvent(f"e{n}", "u1", "page_view", t, **context)


def run(definitions: str, events: list[UserEvent], until: int) -> list[tuple[str, str, int, str]]:
    engine = SegmentEngine(parse_definitions(definitions))
    profile = UserProfile()
    out = []
    for e in events:
        out += engine.on_event("u1", profile, e)
    out += engine.advance_to("u1", profile, until)
    return [(t.segment, t.kind, t.event_time, t.cause) for t in out]


EVENING = """version: t
segments:
  - name: evening
    when: local_hour >= 18 and local_hour < 22
  - name: weekend
    when: local_weekday in ["saturday", "sunday"]
"""


def test_a_segment_on_local_hour_is_entered_and_left_by_timers_at_the_local_hour_in_the_users_zone():
    start = ms("2026-06-05T10:00:00+00:00")  # a Friday, 15:30 in Kolkata
    transitions = run(EVENING, [event(1, start, timezone="Asia/Kolkata")], ms("2026-06-07T00:00:00+00:00"))
    assert transitions == [
        ("evening", "ENTER", ms("2026-06-05T18:00:00+05:30"), "TIMER"),
        ("evening", "EXIT", ms("2026-06-05T22:00:00+05:30"), "TIMER"),
        ("weekend", "ENTER", ms("2026-06-06T00:00:00+05:30"), "TIMER"),
        ("evening", "ENTER", ms("2026-06-06T18:00:00+05:30"), "TIMER"),
        ("evening", "EXIT", ms("2026-06-06T22:00:00+05:30"), "TIMER"),
    ]


def test_without_a_timezone_local_time_is_utc_and_a_later_event_moves_the_user_to_its_zone():
    start = ms("2026-06-05T17:00:00+00:00")
    moved = ms("2026-06-05T18:30:00+00:00")  # evening in UTC, 14:30 in New York
    transitions = run(
        EVENING,
        [event(1, start), event(2, moved, timezone="America/New_York")],
        ms("2026-06-06T00:00:00+00:00"),
    )
    assert transitions == [
        ("evening", "ENTER", ms("2026-06-05T18:00:00+00:00"), "TIMER"),
        ("evening", "EXIT", moved, "EVENT"),
        ("evening", "ENTER", ms("2026-06-05T18:00:00-04:00"), "TIMER"),
    ]


def test_a_segment_on_local_hour_across_a_summer_time_change_enters_at_the_local_hours():
    """New York, 8 March 2026: 02:00 is 03:00. `local_hour == 2` never holds that night."""
    two_am = """version: t
segments:
  - name: at_two
    when: local_hour == 2
  - name: at_three
    when: local_hour == 3
"""
    start = ms("2026-03-07T12:00:00-05:00")
    transitions = run(two_am, [event(1, start, timezone="America/New_York")], ms("2026-03-09T12:00:00-04:00"))
    assert transitions == [
        ("at_three", "ENTER", ms("2026-03-08T03:00:00-04:00"), "TIMER"),  # 07:00 UTC, 02:00 standard time
        ("at_three", "EXIT", ms("2026-03-08T04:00:00-04:00"), "TIMER"),
        ("at_two", "ENTER", ms("2026-03-09T02:00:00-04:00"), "TIMER"),
        ("at_two", "EXIT", ms("2026-03-09T03:00:00-04:00"), "TIMER"),
        ("at_three", "ENTER", ms("2026-03-09T03:00:00-04:00"), "TIMER"),
        ("at_three", "EXIT", ms("2026-03-09T04:00:00-04:00"), "TIMER"),
    ]


@pytest.mark.parametrize(
    "device, expected",
    [("mobile", "mobile"), ("Desktop", "desktop"), (" TABLET ", "tablet"), ("smart-tv", "other"), ("  ", None)],
)
def test_a_device_is_one_of_four_classes(device, expected):
    assert device_class(device) == expected


@pytest.mark.parametrize(
    "condition, message",
    [
        ('device == "phone"', "device is never 'phone': it is one of desktop, mobile, tablet, other"),
        ('local_weekday in ["sat"]', "local_weekday is never 'sat'"),
        ("local_hour > utm_source", "cannot compare local_hour (number) with utm_source (text)"),
        ("ms_since_first_seen < country", "cannot compare"),
    ],
)
def test_the_compiler_checks_context_features_like_the_others(condition, message):
    with pytest.raises(DefinitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_definitions(f"version: t\nsegments:\n  - name: s\n    when: '{condition}'\n")


def test_the_shipped_behavioural_segments_do_not_see_the_context():
    """Issue 20's exactness: the shipped definitions' segments that are not provisional give the
    same transitions over generated traffic with its context and with every context field taken
    out (the model segments left out: they read none of it either, but need the models)."""
    from dataclasses import replace

    from jobs.profile_stats import without_models
    from jobs.settings import SHIPPED_DEFINITIONS
    from udfs.shoppers import generate_events
    from udfs.transitions import replay_events

    definitions = parse_definitions(without_models(SHIPPED_DEFINITIONS.read_bytes()))
    behavioural = {name for name, s in definitions.segments.items() if not s.provisional}
    with_context = list(generate_events(60, 3, ms("2026-06-01T00:00:00+00:00"), 2 * 86_400_000))
    context = dict.fromkeys(("referrer", "utm_source", "utm_medium", "utm_campaign", "country", "timezone"))
    without = [replace(e, device=None, **context) for e in with_context]
    assert any(e.utm_medium for e in with_context) and not any(e.device or e.country for e in without)
    runs = []
    for events in (with_context, without):
        out, _ = replay_events(SegmentEngine(definitions), events, until_ms=2**62)
        runs.append([t.to_record(0) for t in out if t.segment in behavioural])
    assert len(runs[0]) > 500
    assert runs[0] == runs[1]
