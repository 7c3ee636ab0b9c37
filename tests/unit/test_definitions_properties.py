"""Segment transitions of the engine against a brute-force evaluation of the definitions
(tests/unit/definitions_oracle.py) at every event and at every instant where a verdict could
change, for random definitions files and random arrival-ordered event logs (duplicates, resends,
out-of-order events, timers firing at random points); plus examples worked out by hand.

The engine is compared transition by transition: user, segment, kind, event_time, cause, the
cause's event id, sequence, rule and arms, in order (within one instant and cause, exits before entries;
the order among the exits, or among the entries, is not specified and is compared as a set).
Definitions read features of every family, missing values, absent(), holdout() (and the arms the
transitions record), segment references, hysteresis, min_dwell, exclusive groups and two fake model
scores with rescore_every; the logs end with events placed on the instants the definitions'
durations point at, so events often land on the very millisecond of a time-driven change. Examples
whose verdict hangs on float rounding are rejected (definitions_oracle.Ambiguous);
DEFINITIONS_ORACLE_SCALE=10 runs ten times the examples.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from tests.unit.definitions_oracle import (
    DURATION_FEATURES,
    FAKE_MODELS,
    Absent,
    Ambiguous,
    Cmp,
    Defs,
    OTransition,
    Vocab,
    definitions,
    expected_transitions,
    fake_scores,
)
from tests.unit.profile_oracle import Advance
from tests.unit.test_profile_properties import LARGE_CAPS, SMALL, SMALL_SCALE, Scale, event_logs
from udfs.conditions import ModelOutput
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.profile import UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS, Horizon, ProfileConfig
from udfs.transitions import SegmentEngine, Transition, replay_events

B = 1_700_006_400_000  # a UTC day boundary (the event generator starts here)

# Whether a time-driven change due exactly at an event's timestamp is emitted (cause TIMER) before
# the event. docs/definitions.md says no ("emitting any time-driven change due before it"); udfs/transitions.py
# up to commit ec93867 said yes (`self._advance(user_id, profile, event.timestamp)`, `due <= time_ms`).
# Every test here follows this switch (True tests that older engine; the two hand tests at the end
# pin either reading).

# Experiments for holdout(...): u1 is in control of x1 and exp2 and in treatment of winter and
# promo_b; u2 in control of winter and exp2.
HOLDOUTS = (("winter", "60"), ("x1", "30"), ("exp2", "66.6"), ("promo_b", "12.5"))

# Minutes: horizons a = 4 min / 1 min buckets, b = 1 h / 10 min; session gap 10 min; engagement
# half-life 20 min, affinity 30 min; retention 2 h (so profiles expire within a log). Tier
# thresholds off the values a sum of integer weights reaches at whole half-lives.
SEG_SMALL = dataclasses.replace(SMALL, tier_high_above=19.7, tier_medium_above=4.3)
SMALL_VOCAB = Vocab(
    SEG_SMALL,
    durations=(
        (30_000, "30s"),
        (90_000, "90s"),
        (120_000, "2m"),
        (240_000, "4m"),
        (300_000, "5m"),
        (600_000, "10m"),
        (900_000, "15m"),
        (1_800_000, "30m"),
        (3_600_000, "1h"),
        (5_400_000, "90m"),
    ),
    dwells=((90_000, "90s"), (180_000, "3m"), (600_000, "10m"), (1_800_000, "30m"), (3_600_000, "1h")),
    score_scale_ms=10 * MINUTE_MS,
    rescores=((90_000, "90s"), (300_000, "5m"), (1_200_000, "20m")),
    holdouts=HOLDOUTS,
)

# Days: sessions_per_week (7-day marks) as the tier basis, a week-long horizon, retention 10 days.
WEEKLY = ProfileConfig(
    horizons=(Horizon("h", HOUR_MS, 10 * MINUTE_MS), Horizon("w", 7 * DAY_MS, DAY_MS)),
    session_gap_ms=30 * MINUTE_MS,
    engagement_half_life_ms=DAY_MS,
    affinity_half_life_ms=2 * DAY_MS,
    dedup_window_ms=HOUR_MS,
    retention_ms=10 * DAY_MS,
    tier_basis="sessions_per_week",
    tier_high_above=3.0,
    tier_medium_above=1.0,
    affinity_top_k=2,
    **LARGE_CAPS,
)
WEEKLY_SCALE = Scale(
    fwd_ms=45 * MINUTE_MS,
    back_ms=3 * HOUR_MS,
    gap_min_ms=HOUR_MS,
    gap_max_ms=4 * DAY_MS,
    specials=(
        30 * MINUTE_MS,
        30 * MINUTE_MS + 1,
        HOUR_MS,
        6 * HOUR_MS,
        DAY_MS,
        DAY_MS + 1,
        7 * DAY_MS,
        7 * DAY_MS - 1,
        10 * DAY_MS,
    ),
    max_steps=30,
)
WEEKLY_VOCAB = Vocab(
    WEEKLY,
    durations=(
        (10 * MINUTE_MS, "10m"),
        (30 * MINUTE_MS, "30m"),
        (HOUR_MS, "1h"),
        (6 * HOUR_MS, "6h"),
        (DAY_MS, "1d"),
        (3 * DAY_MS, "3d"),
        (7 * DAY_MS, "7d"),
    ),
    dwells=((HOUR_MS, "1h"), (6 * HOUR_MS, "6h"), (DAY_MS, "1d"), (3 * DAY_MS, "3d")),
    holdouts=HOLDOUTS,
)


# ---------------------------------------------------------------- running both


Key = tuple  # (user, segment, kind, event_time, cause, cause_event_id, sequence, rule, arms)


def key(t: Transition | OTransition) -> Key:
    arms = t.arms if isinstance(t, OTransition) else tuple(sorted(t.arms.items()))
    return (t.user_id, t.segment, t.kind, t.event_time, t.cause, t.cause_event_id, t.sequence, t.rule, arms)


def normalised(transitions) -> list[Key]:
    """Runs of one user, instant, cause and event: exits (by segment), then entries (by segment)."""
    out: list[Key] = []
    for _, run in itertools.groupby(map(key, transitions), key=lambda k: (k[0], k[3], k[4], k[5])):
        out += sorted(run, key=lambda k: (k[2] != "EXIT", k[1]))
    return out


def _check_chunk(chunk: list[Transition]) -> None:
    """One step's output: instants never go back, and at one instant and cause exits come first."""
    for a, b in itertools.pairwise(chunk):
        assert a.event_time <= b.event_time, f"time goes back: {key(a)} then {key(b)}"
        if (a.event_time, a.cause) == (b.event_time, b.cause):
            assert not (a.kind == "ENTER" and b.kind == "EXIT"), f"entry before exit: {key(a)} then {key(b)}"


def engine_transitions(engine: SegmentEngine, steps, until_ms: int | None) -> list[Transition]:
    """Steps in arrival order (an Advance moves every user seen so far, as their timers fire),
    then every user to until_ms; the same as replay_events when there is no Advance."""
    profiles: dict[str, UserProfile] = {}
    out: list[Transition] = []
    for step in steps:
        if isinstance(step, Advance):
            chunks = [engine.advance_to(u, p, step.time_ms) for u, p in profiles.items()]
        else:
            profile = profiles.setdefault(step.user_id, UserProfile())
            chunks = [engine.on_event(step.user_id, profile, step)]
        for chunk in chunks:
            _check_chunk(chunk)
            out += chunk
    if until_ms is not None:
        for u, p in profiles.items():
            chunk = engine.advance_to(u, p, until_ms)
            _check_chunk(chunk)
            out += chunk
    return out


def _t(ms: int) -> str:
    return f"B{ms - B:+d}"


def _describe(steps) -> str:
    lines = []
    for i, s in enumerate(steps):
        if isinstance(s, Advance):
            lines.append(f"  [{i}] advance to {_t(s.time_ms)}")
        else:
            lines.append(
                f"  [{i}] {s.user_id} {s.event_id} {s.event_type} t={_t(s.timestamp)} sid={s.session_id} "
                f"prod={s.product_id} cat={s.category} price={s.price} qty={s.quantity}"
            )
    return "\n".join(lines)


def _show(k: Key) -> str:
    user, segment, kind, at, cause, event_id, sequence, rule, arms = k
    shown = f"{user} {segment} {kind} at {_t(at)} {cause}({event_id}) seq+{sequence % 1000} rule={rule!r}"
    return shown + (f" arms={dict(arms)}" if arms else "")


MODELS = {m: ModelOutput(m) for m in FAKE_MODELS}  # probabilities in [0, 1]


def engine_for(compiled, score_scale_ms: int) -> SegmentEngine:
    if not compiled.models:
        return SegmentEngine(compiled)

    def scorer(profile, now_ms, read):
        return fake_scores(read, score_scale_ms)

    return SegmentEngine(compiled, model_version="fake-1", scorer=scorer)


def compare(defs: Defs, config: ProfileConfig, steps, until_ms: int | None, score_scale_ms: int = 0) -> list[Key]:
    yaml_text = defs.yaml()
    compiled = parse_definitions(yaml_text, "prop.yaml", profile_config=config, models=MODELS)
    try:
        want = normalised(expected_transitions(defs, config, steps, until_ms, score_scale_ms))
    except Ambiguous:
        reject()
    got_raw = engine_transitions(engine_for(compiled, score_scale_ms), steps, until_ms)
    if not any(isinstance(s, Advance) for s in steps):
        replayed, _ = replay_events(engine_for(compiled, score_scale_ms), steps, until_ms)
        assert replayed == got_raw, "replay_events differs from on_event + advance_to"
    got = normalised(got_raw)
    if got != want:
        first = next((i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), min(len(got), len(want)))
        lo = max(0, first - 3)
        pytest.fail(
            f"first difference at transition {first} (B = {B}):\n"
            f"engine:\n"
            + "\n".join("  " + _show(k) for k in got[lo : first + 4])
            + "\noracle:\n"
            + "\n".join("  " + _show(k) for k in want[lo : first + 4])
            + f"\ndefinitions:\n{yaml_text}"
            + f"until {_t(until_ms) if until_ms is not None else None}\nsteps:\n{_describe(steps)}"
        )
    return got


# ---------------------------------------------------------------- properties


@st.composite
def until_after(draw, steps, config: ProfileConfig) -> int:
    """The final watermark: mostly far enough for every timer to fire (st.integers alone would
    mostly stop at the last event, leaving the trailing time-driven changes untested)."""
    latest = max(s.time_ms if isinstance(s, Advance) else s.timestamp for s in steps)
    mode = draw(st.sampled_from(("all", "all", "some", "retention", "none")))
    if mode == "all":
        return latest + config.retention_ms + HOUR_MS
    if mode == "some":
        return latest + draw(st.integers(1, config.retention_ms))
    if mode == "retention":
        return latest + config.retention_ms + draw(st.sampled_from((-1, 0, 1)))
    return latest


def _durations_of(defs: Defs) -> list[int]:
    out = set()
    for node in defs.nodes():
        if isinstance(node, Cmp) and node.ref.feature in DURATION_FEATURES:
            out |= {int(node.value // 1), -int(-node.value // 1)}
        elif isinstance(node, Absent):
            out.add(node.window_ms)
    out |= {s.dwell_ms for s in defs.segments.values() if s.dwell_ms}
    return sorted(out)


@st.composite
def logs(draw, scale: Scale, vocab: Vocab, defs: Defs | None = None):
    """test_profile_properties' arrival-ordered logs (new events, resends, out-of-order events,
    timer steps), then a few events on instants where verdicts tend to change: the latest (or an
    earlier) event's time plus a duration the definitions use, or a horizon's lapse, -1, 0 or +1 ms
    (so an event often lands on the very instant of a time-driven change). They go at the end,
    never more than back_ms behind the latest time, as the generator's own late events. Then,
    sometimes, the cases that found issue 16's bugs: an add to the cart and a purchase at one
    millisecond (a stay that begins and ends at once), and an earlier event's id sent again
    when its lifetime has ended or is about to (last event + retention - 1, + 0, + 1 ms)."""
    steps = draw(event_logs(scale, vocab.config))
    latest = max(s.time_ms if isinstance(s, Advance) else s.timestamp for s in steps)
    offsets = (_durations_of(defs) if defs is not None else []) or [ms for ms, _ in vocab.durations]
    offsets += [vocab.config.session_gap_ms]
    for i in range(draw(st.integers(0, 4))):
        events = [s for s in steps if not isinstance(s, Advance)]
        anchor = max(e.timestamp for e in events) if draw(st.booleans()) else draw(st.sampled_from(events)).timestamp
        if draw(st.integers(0, 3)):
            t = anchor + draw(st.sampled_from(offsets))
        else:
            t = draw(st.sampled_from(vocab.config.horizons)).lapses_at(anchor)
        t = max(t + draw(st.sampled_from((-1, 0, 0, 1))), latest - scale.back_ms)
        event_type = draw(st.sampled_from(("page_view", "product_view", "add_to_cart", "purchase", "search")))
        steps.append(
            UserEvent(
                f"t{i}",
                "u1",
                event_type,
                t,
                product_id=draw(st.sampled_from(("p1", "p2"))),
                category=draw(st.sampled_from(("c1", "c2", None))),
                quantity=1,
            )
        )
        latest = max(latest, t)
    if draw(st.integers(0, 3)) == 0:
        t = latest + draw(st.sampled_from((0, 1, MINUTE_MS)))
        steps += [
            UserEvent("same-ms-add", "u1", "add_to_cart", t, product_id="p1", quantity=1, price=3.0),
            UserEvent("same-ms-buy", "u1", "purchase", t, price=3.0),
        ]
        latest = t
    if draw(st.integers(0, 3)) == 0:
        events = [s for s in steps if not isinstance(s, Advance)]
        # The latest event's id is within the dedup window of the lifetime's last event.
        reused = max(events, key=lambda e: e.timestamp) if draw(st.booleans()) else draw(st.sampled_from(events))
        t = latest + vocab.config.retention_ms + draw(st.sampled_from((-1, 0, 1)))
        steps.append(dataclasses.replace(reused, timestamp=t))
    return steps


# DEFINITIONS_ORACLE_SCALE=10 runs ten times the examples (a deeper search, e.g. after an engine change).
SCALE = float(os.environ.get("DEFINITIONS_ORACLE_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


PROPERTY = settings(
    max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)


@PROPERTY
@given(definitions(SMALL_VOCAB), st.data())
def test_transitions_match_the_oracle_minutes(defs, data):
    steps = data.draw(logs(SMALL_SCALE, SMALL_VOCAB, defs), label="steps")
    compare(
        defs,
        SEG_SMALL,
        steps,
        data.draw(until_after(steps, SEG_SMALL), label="until"),
        score_scale_ms=SMALL_VOCAB.score_scale_ms,
    )


@settings(PROPERTY, max_examples=examples(60))
@given(definitions(WEEKLY_VOCAB), st.data())
def test_transitions_match_the_oracle_days(defs, data):
    steps = data.draw(logs(WEEKLY_SCALE, WEEKLY_VOCAB, defs), label="steps")
    compare(defs, WEEKLY, steps, data.draw(until_after(steps, WEEKLY), label="until"))


@st.composite
def two_users(draw, scale: Scale, config: ProfileConfig):
    """Two users' logs (without timer steps), interleaved at random: what replay_events takes."""
    logs = []
    for user in ("u1", "u2"):
        steps = draw(event_logs(dataclasses.replace(scale, max_steps=20), config))
        logs.append([dataclasses.replace(s, user_id=user) for s in steps if not isinstance(s, Advance)])
    order = draw(st.permutations([0] * len(logs[0]) + [1] * len(logs[1])))
    cursors = [iter(logs[0]), iter(logs[1])]
    return [next(cursors[i]) for i in order]


@settings(PROPERTY, max_examples=examples(40))
@given(definitions(SMALL_VOCAB), two_users(SMALL_SCALE, SEG_SMALL), st.data())
def test_transitions_match_the_oracle_two_users_replay(defs, events, data):
    compare(
        defs,
        SEG_SMALL,
        events,
        data.draw(until_after(events, SEG_SMALL), label="until"),
        score_scale_ms=SMALL_VOCAB.score_scale_ms,
    )


# ---------------------------------------------------------------- examples worked out by hand
# Each expectation below is computed from docs/definitions.md and docs/features.md by hand; the engine and the
# oracle are both checked against it (so these also validate the oracle).

HAND = ProfileConfig(
    horizons=(Horizon("a", 4 * MINUTE_MS, MINUTE_MS), Horizon("b", HOUR_MS, 10 * MINUTE_MS)),
    session_gap_ms=10 * MINUTE_MS,
    engagement_half_life_ms=10 * MINUTE_MS,
    retention_ms=DAY_MS,
    **LARGE_CAPS,
)


def ev(event_id: str, event_type: str, t: int, **kw) -> UserEvent:
    return UserEvent(event_id=event_id, user_id="u1", event_type=event_type, timestamp=t, **kw)


def both(yaml_text: str, defs: Defs, steps, until_ms: int, config: ProfileConfig = HAND, score_scale_ms: int = 0):
    """The engine's and the oracle's transitions as (segment, kind, offset from B, cause, rule)."""
    assert defs.yaml() == yaml_text  # the tree below is the file above
    compiled = parse_definitions(yaml_text, "hand.yaml", profile_config=config, models=MODELS)
    engine = engine_transitions(engine_for(compiled, score_scale_ms), steps, until_ms)
    oracle = expected_transitions(defs, config, steps, until_ms, score_scale_ms)

    def short(ts):
        return [(k[1], k[2], k[3] - B, k[4], k[7]) for k in normalised(ts)]

    return short(engine), short(oracle)


def test_hysteresis_on_a_decaying_engagement_score():
    from tests.unit.definitions_oracle import Cmp, Ref, SegDef

    # A purchase (20 points) at B, half-life 10 min: 20 * 2^(-x / 10 min).
    # `above5` holds while the score is above 5; `steady` enters above 15 and leaves below 5.
    score = Ref("engagement_score")
    defs = Defs(
        "hand-1",
        (
            SegDef("above5", Cmp(score, ">", 5.0, "5"), None),
            SegDef("steady", Cmp(score, ">", 15.0, "15"), Cmp(score, "<", 5.0, "5")),
        ),
        ("above5", "steady"),
    )
    yaml_text = """version: hand-1
segments:
  - name: above5
    when: 'engagement_score > 5'
  - name: steady
    enter: 'engagement_score > 15'
    exit: 'engagement_score < 5'
"""
    steps = [
        ev("p1", "purchase", B, price=1.0),
        ev("v1", "page_view", B + 10 * MINUTE_MS),
        ev("p2", "purchase", B + 30 * MINUTE_MS, price=1.0),
    ]
    # The page view at B + 10 min (score 10 + 1 = 11) changes nothing: above 5, not below 5. From
    # there the score is 20 * 2^(-x/10m) + 2^(-(x - 10m)/10m) = 22 * 2^(-x/10m), which is 5 at
    # x = 10 min * log2(4.4) = 1,282,502.1 ms: the first whole ms not above 5 (and below 5) is
    # B + 1,282,503, where both leave. At B + 30 min the score is 22/8 + 20 = 22.75: both enter on
    # the purchase; 22.75 * 2^(-y/10m) is 5 at y = 10 min * log2(4.55) = 1,311,519.x ms.
    engine, oracle = both(yaml_text, defs, steps, B + 2 * HOUR_MS)
    crossing, later = 1_282_503, 30 * MINUTE_MS + 1_311_520
    assert 22 * 2 ** (-crossing / 600_000) < 5 < 22 * 2 ** (-(crossing - 1) / 600_000)
    y = later - 30 * MINUTE_MS
    assert 22.75 * 2 ** (-y / 600_000) < 5 < 22.75 * 2 ** (-(y - 1) / 600_000)
    expected = [
        ("above5", "ENTER", 0, "EVENT", "engagement_score > 5"),
        ("steady", "ENTER", 0, "EVENT", "engagement_score > 15"),
        ("above5", "EXIT", crossing, "TIMER", "not (engagement_score > 5)"),
        ("steady", "EXIT", crossing, "TIMER", "engagement_score < 5"),
        ("above5", "ENTER", 30 * MINUTE_MS, "EVENT", "engagement_score > 5"),
        ("steady", "ENTER", 30 * MINUTE_MS, "EVENT", "engagement_score > 15"),
        ("above5", "EXIT", later, "TIMER", "not (engagement_score > 5)"),
        ("steady", "EXIT", later, "TIMER", "engagement_score < 5"),
    ]
    assert oracle == expected
    assert engine == expected


def test_hysteresis_exit_one_ms_after_a_when_at_an_exact_value():
    from tests.unit.definitions_oracle import Cmp, Ref, SegDef

    # One purchase: 20 * 2^(-x/10m) is exactly 5.0 at x = 20 min (two half-lives, exact in floats).
    # `> 5` stops holding at B + 20 min; `< 5` first holds at B + 20 min + 1 ms.
    score = Ref("engagement_score")
    defs = Defs(
        "hand-2",
        (
            SegDef("above5", Cmp(score, ">", 5.0, "5"), None),
            SegDef("steady", Cmp(score, ">", 15.0, "15"), Cmp(score, "<", 5.0, "5")),
        ),
        ("above5", "steady"),
    )
    yaml_text = """version: hand-2
segments:
  - name: above5
    when: 'engagement_score > 5'
  - name: steady
    enter: 'engagement_score > 15'
    exit: 'engagement_score < 5'
"""
    assert 20 * 2.0 ** (-(20 * MINUTE_MS) / (10 * MINUTE_MS)) == 5.0
    steps = [ev("p1", "purchase", B, price=1.0)]
    # The oracle's float-tie guard would refuse this exact hit, so only the engine is checked.
    compiled = parse_definitions(yaml_text, "hand.yaml", profile_config=HAND)
    assert defs.yaml() == yaml_text
    got = [
        (t.segment, t.kind, t.event_time - B, t.cause)
        for t in engine_transitions(SegmentEngine(compiled), steps, B + HOUR_MS)
    ]
    assert got == [
        ("above5", "ENTER", 0, "EVENT"),
        ("steady", "ENTER", 0, "EVENT"),
        ("above5", "EXIT", 20 * MINUTE_MS, "TIMER"),
        ("steady", "EXIT", 20 * MINUTE_MS + 1, "TIMER"),
    ]


def test_min_dwell_delays_an_exit_to_the_dwell_end():
    from tests.unit.definitions_oracle import Cmp, Ref, SegDef

    recent = Cmp(Ref("ms_since_last_event"), "<", 120_000.0, "2m")
    defs = Defs("hand-3", (SegDef("sticky", recent, None, 10 * MINUTE_MS, "10m"),), ("sticky",))
    yaml_text = """version: hand-3
segments:
  - name: sticky
    when: 'ms_since_last_event < 2m'
    min_dwell: 10m
"""
    # Entered at B. The condition stops holding at B + 2 min, but the dwell runs to B + 10 min:
    # the exit is checked again there, and made.
    engine, oracle = both(yaml_text, defs, [ev("e1", "page_view", B)], B + HOUR_MS)
    expected = [
        ("sticky", "ENTER", 0, "EVENT", "ms_since_last_event < 2m"),
        ("sticky", "EXIT", 10 * MINUTE_MS, "TIMER", "not (ms_since_last_event < 2m)"),
    ]
    assert oracle == expected and engine == expected
    # An event at B + 9 min keeps the condition true until B + 11 min: at the dwell end it still
    # holds, so the exit waits for the lapse itself.
    steps = [ev("e1", "page_view", B), ev("e2", "page_view", B + 9 * MINUTE_MS)]
    engine, oracle = both(yaml_text, defs, steps, B + HOUR_MS)
    expected = [
        ("sticky", "ENTER", 0, "EVENT", "ms_since_last_event < 2m"),
        ("sticky", "EXIT", 11 * MINUTE_MS, "TIMER", "not (ms_since_last_event < 2m)"),
    ]
    assert oracle == expected and engine == expected


def _tier_defs(dwell: tuple[int, str] | None):
    from tests.unit.definitions_oracle import Cmp, Const, GroupDef, Ref, SegDef

    views = Ref("count_page_view_a")
    hi = SegDef("hi", Cmp(views, ">=", 3.0, "3"), Cmp(views, "<=", 1.0, "1"), *((dwell[0], dwell[1]) if dwell else ()))
    lo = SegDef("lo", Const(True), None)
    defs = Defs("hand-4", (GroupDef("tier", (hi, lo)),), ("hi", "lo"))
    yaml_text = f"""version: hand-4
segments:
  - name: hi
    enter: 'count_page_view_a >= 3'
    exit: 'count_page_view_a <= 1'
{f"    min_dwell: {dwell[1]}" + chr(10) if dwell else ""}  - name: lo
    when: true
exclusive_groups:
  - name: tier
    segments: [hi, lo]
"""
    return defs, yaml_text


def test_a_group_switches_tiers_exit_before_enter():
    # Horizon a: 4 min of 1-minute buckets. Page views at B, B+1m, B+2m.
    # B: lo enters (true). B+2m: 3 views -> hi takes precedence: lo exits first, then hi enters.
    # The view at B leaves the horizon at B+4m (2 views: hi stays, its exit needs <= 1), the one at
    # B+1m at B+5m (1 view): hi leaves by its own exit and lo, the next that holds, enters.
    defs, yaml_text = _tier_defs(None)
    steps = [ev(f"v{i}", "page_view", B + i * MINUTE_MS) for i in range(3)]
    engine, oracle = both(yaml_text, defs, steps, B + HOUR_MS)
    expected = [
        ("lo", "ENTER", 0, "EVENT", "true"),
        ("lo", "EXIT", 2 * MINUTE_MS, "EVENT", "exclusive group tier: hi took precedence (count_page_view_a >= 3)"),
        ("hi", "ENTER", 2 * MINUTE_MS, "EVENT", "count_page_view_a >= 3"),
        ("hi", "EXIT", 5 * MINUTE_MS, "TIMER", "count_page_view_a <= 1"),
        ("lo", "ENTER", 5 * MINUTE_MS, "TIMER", "true"),
    ]
    assert oracle == expected and engine == expected


def test_a_group_holds_still_while_its_members_dwell_runs():
    # As above with hi's min_dwell 10m: entered at B+2m, the group cannot change before B+12m;
    # by then every view has left the 4-minute horizon (0 <= 1): hi exits, lo enters at B+12m.
    defs, yaml_text = _tier_defs((10 * MINUTE_MS, "10m"))
    steps = [ev(f"v{i}", "page_view", B + i * MINUTE_MS) for i in range(3)]
    engine, oracle = both(yaml_text, defs, steps, B + HOUR_MS)
    expected = [
        ("lo", "ENTER", 0, "EVENT", "true"),
        ("lo", "EXIT", 2 * MINUTE_MS, "EVENT", "exclusive group tier: hi took precedence (count_page_view_a >= 3)"),
        ("hi", "ENTER", 2 * MINUTE_MS, "EVENT", "count_page_view_a >= 3"),
        ("hi", "EXIT", 12 * MINUTE_MS, "TIMER", "count_page_view_a <= 1"),
        ("lo", "ENTER", 12 * MINUTE_MS, "TIMER", "true"),
    ]
    assert oracle == expected and engine == expected


def test_retention_exits_everything_and_a_new_lifetime_starts_its_own_sequences():
    from tests.unit.definitions_oracle import Cmp, Const, Ref, SegDef

    defs = Defs(
        "hand-5",
        (SegDef("always", Const(True), None), SegDef("buyer", Cmp(Ref("lifetime_orders"), ">", 0.0, "0"), None)),
        ("always", "buyer"),
    )
    yaml_text = """version: hand-5
segments:
  - name: always
    when: true
  - name: buyer
    when: 'lifetime_orders > 0'
"""
    # Retention 1 day after the last event (B + 1h): both exit at B + 1h + 1d; the page view at
    # B + 2d starts a new lifetime: `always` enters again with sequence 1000 * (B + 2d) + 1.
    steps = [ev("p", "purchase", B, price=3.0), ev("v", "page_view", B + HOUR_MS), ev("w", "page_view", B + 2 * DAY_MS)]
    compiled = parse_definitions(yaml_text, "hand.yaml", profile_config=HAND)
    assert defs.yaml() == yaml_text
    engine = normalised(engine_transitions(SegmentEngine(compiled), steps, B + 2 * DAY_MS))
    oracle = normalised(expected_transitions(defs, HAND, steps, B + 2 * DAY_MS, True))
    expiry = B + HOUR_MS + DAY_MS
    expected = [
        ("u1", "always", "ENTER", B, "EVENT", "p", 1000 * B + 1, "true", ()),
        ("u1", "buyer", "ENTER", B, "EVENT", "p", 1000 * B + 1, "lifetime_orders > 0", ()),
        ("u1", "always", "EXIT", expiry, "TIMER", None, 1000 * B + 2, "profile_retention_expired", ()),
        ("u1", "buyer", "EXIT", expiry, "TIMER", None, 1000 * B + 2, "profile_retention_expired", ()),
        ("u1", "always", "ENTER", B + 2 * DAY_MS, "EVENT", "w", 1000 * (B + 2 * DAY_MS) + 1, "true", ()),
    ]
    assert oracle == expected and engine == expected


def test_two_keys_of_a_map_lapse_each_at_their_own_instant():
    from tests.unit.definitions_oracle import Ref, SegDef

    # A key of ms_since_viewed_product is listed while some horizon covers its latest view; here
    # the 1 h horizon (10-minute buckets) covers longest. p1 viewed at B+2m30s: more than 5 min
    # ago from B+7m30s+1ms; no longer listed (missing: the comparison is false) from
    # bucket(B+2m30s) + 1h = B+60m. p2 viewed at B+15m: at least 1 min ago from B+16m; listed
    # until B+10m + 1h = B+70m.
    v1 = Cmp(Ref("ms_since_viewed_product", "p1"), ">", 300_000.0, "5m")
    v2 = Cmp(Ref("ms_since_viewed_product", "p2"), ">=", 60_000.0, "1m")
    defs = Defs("hand-7", (SegDef("v1", v1, None), SegDef("v2", v2, None)), ("v1", "v2"))
    yaml_text = """version: hand-7
segments:
  - name: v1
    when: 'ms_since_viewed_product["p1"] > 5m'
  - name: v2
    when: 'ms_since_viewed_product["p2"] >= 1m'
"""
    steps = [
        ev("a", "product_view", B + 150_000, product_id="p1"),
        ev("b", "product_view", B + 15 * MINUTE_MS, product_id="p2"),
    ]
    engine, oracle = both(yaml_text, defs, steps, B + 2 * HOUR_MS)
    expected = [
        ("v1", "ENTER", 450_001, "TIMER", 'ms_since_viewed_product["p1"] > 5m'),
        ("v2", "ENTER", 16 * MINUTE_MS, "TIMER", 'ms_since_viewed_product["p2"] >= 1m'),
        ("v1", "EXIT", 60 * MINUTE_MS, "TIMER", 'not (ms_since_viewed_product["p1"] > 5m)'),
        ("v2", "EXIT", 70 * MINUTE_MS, "TIMER", 'not (ms_since_viewed_product["p2"] >= 1m)'),
    ]
    assert oracle == expected and engine == expected


def test_the_tier_on_sessions_per_week_changes_at_the_drop_that_crosses_a_threshold():
    from tests.unit.definitions_oracle import Cmp, Ref, SegDef

    # Tier basis sessions_per_week: high above 3, medium above 1. Five sessions (ids k0..k4) whose
    # last events are at B, B+1h, ..., B+4h: low, medium (from 2), high (from 4). Each stops
    # counting 7 days after its last event: 4 at B+7d (still high), 3 at B+7d+1h (medium),
    # 2 at B+7d+2h, 1 at B+7d+3h (low).
    config = ProfileConfig(
        horizons=(Horizon("a", HOUR_MS, 10 * MINUTE_MS),),
        retention_ms=10 * DAY_MS,
        tier_basis="sessions_per_week",
        tier_high_above=3.0,
        tier_medium_above=1.0,
    )
    tier = Ref("engagement_tier")
    defs = Defs(
        "hand-8",
        (SegDef("hi", Cmp(tier, "==", "high", '"high"'), None), SegDef("lo", Cmp(tier, "==", "low", '"low"'), None)),
        ("hi", "lo"),
    )
    yaml_text = """version: hand-8
segments:
  - name: hi
    when: 'engagement_tier == "high"'
  - name: lo
    when: 'engagement_tier == "low"'
"""
    steps = [ev(f"e{i}", "page_view", B + i * HOUR_MS, session_id=f"k{i}") for i in range(5)]
    engine, oracle = both(yaml_text, defs, steps, B + 8 * DAY_MS, config=config)
    week = 7 * DAY_MS
    expected = [
        ("lo", "ENTER", 0, "EVENT", 'engagement_tier == "low"'),
        ("lo", "EXIT", HOUR_MS, "EVENT", 'not (engagement_tier == "low")'),
        ("hi", "ENTER", 3 * HOUR_MS, "EVENT", 'engagement_tier == "high"'),
        ("hi", "EXIT", week + HOUR_MS, "TIMER", 'not (engagement_tier == "high")'),
        ("lo", "ENTER", week + 3 * HOUR_MS, "TIMER", 'engagement_tier == "low"'),
    ]
    assert oracle == expected and engine == expected


def test_scores_are_computed_at_each_event_and_every_rescore_interval():
    from tests.unit.definitions_oracle import Cmp, Missing, Ref, SegDef

    # Fake models: fresh = 1 / (1 + ms_since_last_event / 10 min), cartp missing while the cart is
    # empty. rescore_every 5m: rescored 5 min after the latest scoring while no event comes.
    # B: fresh 1.0 (> 0.81), cartp missing. B+5m rescore: fresh 1/1.5 = 0.67: s0 leaves.
    # B+7m add_to_cart: fresh 1.0 again, cartp 0.5. B+12m rescore: 0.67, s0 leaves again.
    defs = Defs(
        "hand-9",
        (
            SegDef("s0", Cmp(Ref("score.fresh"), ">", 0.81, "0.81"), None),
            SegDef("s1", Missing(Ref("score.cartp")), None),
        ),
        ("s0", "s1"),
        300_000,
        "5m",
    )
    yaml_text = """version: hand-9
rescore_every: 5m
segments:
  - name: s0
    when: 'score.fresh > 0.81'
  - name: s1
    when: 'missing(score.cartp)'
"""
    steps = [ev("a", "page_view", B), ev("b", "add_to_cart", B + 7 * MINUTE_MS, product_id="p1", quantity=1)]
    engine, oracle = both(yaml_text, defs, steps, B + 30 * MINUTE_MS, score_scale_ms=10 * MINUTE_MS)
    expected = [
        ("s0", "ENTER", 0, "EVENT", "score.fresh > 0.81"),
        ("s1", "ENTER", 0, "EVENT", "missing(score.cartp)"),
        ("s0", "EXIT", 5 * MINUTE_MS, "TIMER", "not (score.fresh > 0.81)"),
        ("s1", "EXIT", 7 * MINUTE_MS, "EVENT", "not (missing(score.cartp))"),
        ("s0", "ENTER", 7 * MINUTE_MS, "EVENT", "score.fresh > 0.81"),
        ("s0", "EXIT", 12 * MINUTE_MS, "TIMER", "not (score.fresh > 0.81)"),
    ]
    assert oracle == expected and engine == expected


# ---------------------------------------------------------------- the docs against the engine


def test_an_event_exactly_at_the_retention_expiry_starts_a_new_lifetime():
    from tests.unit.definitions_oracle import Cmp, Ref, SegDef

    # docs/features.md: "when the clock reaches last_event + retention, the profile is dropped", and
    # an event's timestamp moves the clock there before the event is applied. So the purchase's
    # lifetime ends at B + 1d (exit, profile_retention_expired) and the page view at B + 1d starts
    # a new lifetime with no orders.
    defs = Defs("hand-10", (SegDef("buyer", Cmp(Ref("lifetime_orders"), ">", 0.0, "0"), None),), ("buyer",))
    yaml_text = """version: hand-10
segments:
  - name: buyer
    when: 'lifetime_orders > 0'
"""
    steps = [ev("p", "purchase", B, price=3.0), ev("v", "page_view", B + DAY_MS)]
    engine, oracle = both(yaml_text, defs, steps, B + DAY_MS + HOUR_MS)
    expected = [
        ("buyer", "ENTER", 0, "EVENT", "lifetime_orders > 0"),
        ("buyer", "EXIT", DAY_MS, "TIMER", "profile_retention_expired"),
    ]
    assert oracle == expected
    assert engine == expected


def _lapse_at_event_instant():
    from tests.unit.definitions_oracle import Cmp, Ref, SegDef

    defs = Defs(
        "hand-6", (SegDef("active", Cmp(Ref("ms_since_last_event"), "<", 600_000.0, "10m"), None),), ("active",)
    )
    yaml_text = """version: hand-6
segments:
  - name: active
    when: 'ms_since_last_event < 10m'
"""
    assert defs.yaml() == yaml_text
    # The second event comes exactly when `ms_since_last_event < 10m` stops holding.
    steps = [ev("e1", "page_view", B), ev("e2", "page_view", B + 10 * MINUTE_MS)]
    return defs, yaml_text, steps


def test_a_lapse_due_exactly_at_an_events_timestamp_is_absorbed_by_the_event_per_the_readme():
    defs, yaml_text, steps = _lapse_at_event_instant()
    engine, oracle = both(yaml_text, defs, steps, B + 10 * MINUTE_MS)
    expected = [("active", "ENTER", 0, "EVENT", "ms_since_last_event < 10m")]  # still active after e2
    assert oracle == expected
    assert engine == expected
