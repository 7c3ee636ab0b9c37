"""The identity merge's fold (udfs/identity.py) against the brute-force oracle: a profile built from
an anonymous id's events folded into one built from a known id's events reads the same features as
the oracle computes from the union of both logs (the known id's steps, then the anonymous id's
events arriving after them, as the fold brings them in).

The union is compared where it is one: no lifetime of either log, or of the union, was reset by
the retention, and the union's dedup accepted exactly the events each id accepted on its own (a
resend of an anonymous event can be a duplicate on its own and not in the union, whose latest
event is later: the dedup window is measured from it). A third is a session id: when the
anonymous profile had already forgotten a session (no feature could see it at its clock) and the
known id has a live session of the same id, the union's late events would join it, but the fold
has nothing left to join. All three are checked with `assume`.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.unit.profile_oracle import Advance, features_of, forgotten, replay, sessions_of
from tests.unit.test_profile_properties import (
    DEFAULT_40D,
    DEFAULT_SCALE,
    SMALL,
    SMALL_SCALE,
    Scale,
    event_logs,
    feature_problems,
    no_segments,
)
from udfs.identity import merge_profiles
from udfs.profile import UserProfile, prune
from udfs.profile_config import MINUTE_MS, ProfileConfig
from udfs.transitions import SegmentEngine

KNOWN, ANONYMOUS = "known", "anon"


def _as_user(steps: list, user_id: str, prefix: str, shift_ms: int) -> list:
    """The log as another user's, its event ids prefixed (the two ids never share an event) and
    every time shifted (so the two logs overlap in different ways)."""
    out = []
    for step in steps:
        if isinstance(step, Advance):
            out.append(Advance(step.time_ms + shift_ms))
        else:
            out.append(
                dataclasses.replace(
                    step, user_id=user_id, event_id=prefix + step.event_id, timestamp=step.timestamp + shift_ms
                )
            )
    return out


@st.composite
def two_logs(draw, scale: Scale, config: ProfileConfig):
    known = _as_user(draw(event_logs(scale, config)), KNOWN, "k", 0)
    shift = draw(st.sampled_from((0, 0, MINUTE_MS, -MINUTE_MS))) * draw(st.integers(0, 30))
    anonymous = _as_user(draw(event_logs(scale, config)), ANONYMOUS, "a", shift)
    return known, anonymous


def _profile_of(engine: SegmentEngine, user_id: str, steps: list) -> UserProfile:
    profile = UserProfile()
    for step in steps:
        if isinstance(step, Advance):
            engine.step_timer(user_id, profile, step.time_ms)
        else:
            engine.step_event(user_id, profile, step)
    return profile


def _accepted(r) -> list[tuple[str, int]]:
    return sorted((a.event.event_id, a.t) for a in r.accepted)


def _forgot_a_named_session(r, config: ProfileConfig) -> bool:
    """True when the replay forgot a named session: one id in several incarnations (the earlier
    ones forgotten when the next began), or its one incarnation forgotten at the final clock."""
    named = [s for s in sessions_of(r.accepted, config) if s.session_id is not None]
    ids = [s.session_id for s in named]
    return len(ids) != len(set(ids)) or any(forgotten(s.last, r.clock_ms, config) for s in named)


def check_merge_matches_union(known_steps: list, anonymous_steps: list, config: ProfileConfig) -> None:
    known_replay, anonymous_replay = replay(known_steps, config), replay(anonymous_steps, config)
    union = replay(known_steps + [s for s in anonymous_steps if not isinstance(s, Advance)], config)
    assume(known_replay.resets == anonymous_replay.resets == union.resets == 0)
    assume(_accepted(union) == sorted(_accepted(known_replay) + _accepted(anonymous_replay)))
    assume(not _forgot_a_named_session(anonymous_replay, config))
    now = max(c for c in (known_replay.clock_ms, anonymous_replay.clock_ms) if c is not None)

    engine = SegmentEngine(no_segments(config))
    known = _profile_of(engine, KNOWN, known_steps)
    anonymous = _profile_of(engine, ANONYMOUS, anonymous_steps)
    anonymous_before = engine.features(anonymous, anonymous.clock_ms)
    merge_profiles(known, anonymous, config)
    assert known.clock_ms == now
    prune(known, config)  # what the merged profile keeps must still read the union
    problems = feature_problems(engine.features(known, now), features_of(union.accepted, config, now), config)
    if problems:
        pytest.fail("merged profile vs the union's oracle:\n" + "\n".join(problems))
    assert engine.features(anonymous, anonymous.clock_ms) == anonymous_before, "the fold changed the anonymous side"


MERGE_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)


@MERGE_SETTINGS
@given(two_logs(SMALL_SCALE, SMALL))
def test_merge_matches_union_small_config(logs):
    check_merge_matches_union(*logs, SMALL)


@MERGE_SETTINGS
@given(two_logs(DEFAULT_SCALE, DEFAULT_40D))
def test_merge_matches_union_default_horizons(logs):
    check_merge_matches_union(*logs, DEFAULT_40D)
