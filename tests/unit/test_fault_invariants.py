"""The fault suite's checker catches each kind of broken run: a dropped, repeated, reordered or
altered transition, a Redis view that went backwards, a lost or extra dead letter."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from tests.e2e.invariants import (
    Committed,
    dead_letter_differences,
    differences_from_fault_free,
    memberships_of,
    missing_transitions,
    redis_differences,
    repeated_or_out_of_sequence,
)
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.transitions import replay_events


@pytest.fixture(scope="module")
def run():
    events = list(generate_events(20, seed=3, start_ms=START_MS, duration_ms=6 * 3600_000))
    segmentation = Segmentation.load(SHIPPED_DEFINITIONS)
    expected, _ = replay_events(segmentation.engine(), events, until_ms=events[-1].timestamp + 3600_000)
    assert len(expected) > 30
    # A faithful log: every user's transitions in order, users spread over two partitions.
    committed = [
        Committed(hash(t.user_id) % 2, i, t.to_record(emitted_at=START_MS + i)) for i, t in enumerate(expected)
    ]
    return expected, committed, segmentation.definitions.names


def all_problems(expected, committed):
    return (
        missing_transitions(expected, committed)
        + repeated_or_out_of_sequence(committed)
        + differences_from_fault_free(expected, committed)
    )


def test_a_faithful_log_passes(run):
    expected, committed, _ = run
    assert all_problems(expected, committed) == []


def test_a_dropped_transition_is_missing_and_breaks_the_alternation(run):
    expected, committed, _ = run
    dropped = committed[:5] + committed[6:]
    assert missing_transitions(expected, dropped) == [
        f"missing {committed[5].transition_id} "
        f"({expected[5].user_id} {expected[5].segment} "
        f"{expected[5].kind} #{expected[5].sequence})"
    ]


def test_a_transition_committed_twice_is_reported(run):
    expected, committed, _ = run
    twice = [*committed, replace(committed[3], offset=10_000)]
    assert f"{committed[3].transition_id} committed 2 times" in repeated_or_out_of_sequence(twice)
    assert missing_transitions(expected, twice) == []


def test_a_sequence_gap_or_two_enters_in_a_row_is_reported(run):
    expected, committed, _ = run
    first_enter = committed[0]
    bumped = replace(
        first_enter, offset=10_000, record={**first_enter.record, "sequence": 10**9, "transition_id": "other"}
    )
    problems = repeated_or_out_of_sequence([*committed, bumped])
    assert any("is ENTER, expected EXIT" in p or "follows" in p for p in problems)


def test_an_altered_field_or_an_unexpected_transition_differs_from_the_fault_free_run(run):
    expected, committed, _ = run
    altered = list(committed)
    altered[2] = replace(
        committed[2],
        record={**committed[2].record, "cause": "EVENT" if committed[2].record["cause"] != "EVENT" else "TIMER"},
    )
    [difference] = differences_from_fault_free(expected, altered)
    assert difference.startswith(f"{committed[2].transition_id} ") and "cause: expected" in difference
    extra = replace(committed[0], offset=10_000, record={**committed[0].record, "transition_id": "x"})
    assert differences_from_fault_free(expected, [*committed, extra])[0].startswith("unexpected x")
    # The emission time is the one field a replay may change.
    later = [replace(c, record={**c.record, "emitted_at": c.record["emitted_at"] + 5}) for c in committed]
    assert differences_from_fault_free(expected, later) == []


def test_a_user_s_transitions_in_another_order_are_reported(run):
    expected, committed, _ = run
    user = max({t.user_id for t in expected}, key=lambda u: sum(t.user_id == u for t in expected))
    mine = [c for c in committed if c.record["user_id"] == user]
    swapped = [c for c in committed if c.record["user_id"] != user]
    offsets = [c.offset for c in mine]
    swapped += [replace(c, offset=o) for c, o in zip(mine, [offsets[1], offsets[0], *offsets[2:]], strict=True)]
    assert f"{user}: transitions committed in another order" in differences_from_fault_free(expected, swapped)


class FakeView:
    def __init__(self, memberships):
        self.memberships = memberships

    def segments_of(self, user):
        return dict(self.memberships.get(user, {}))

    def members(self, segment):
        return {u for u, segs in self.memberships.items() if segment in segs}


def test_redis_equal_to_the_log_passes_and_a_view_gone_backwards_fails(run):
    _, committed, segments = run
    replayed = memberships_of(committed)
    assert redis_differences(committed, FakeView(replayed), segments) == []
    # The view as it was before the last transition: a replay that moved it backwards.
    before_last = memberships_of(committed[:-1])
    assert redis_differences(committed, FakeView(before_last), segments) != []
    assert redis_differences(committed, FakeView({}), segments) != []


def test_dead_letters_exactly_the_injected_ones(run):
    injected = [("bad_magic", b"junk"), ("late", b"late-event")]
    letters = [{"reason": "bad_magic", "payload": b"junk"}, {"reason": "late", "payload": b"late-event"}]
    valid = {b"valid-1", b"valid-2"}
    assert dead_letter_differences(injected, letters, valid) == []
    assert dead_letter_differences(injected, letters[:1], valid) == ["dead letter late missing (10 bytes)"]
    wrongly = [*letters, {"reason": "late", "payload": b"valid-1"}]
    assert dead_letter_differences(injected, wrongly, valid) == [
        "unexpected dead letter late (7 bytes)",
        "a valid event was dead-lettered as late",
    ]


def test_a_new_lifetime_s_first_enter_may_jump_but_no_other_transition_may(run):
    """After an EXIT, an ENTER at 1000 x a later first event's time + 1 is a new profile lifetime
    (after the retention, an erasure or a withdrawn consent); a jump to any other sequence is not."""
    _, committed, _ = run
    enter = next(c for c in committed if c.record["kind"] == "ENTER")
    pair = [
        c
        for c in committed
        if c.record["user_id"] == enter.record["user_id"] and c.record["segment"] == enter.record["segment"]
    ]
    exit_ = next(c for c in pair if c.record["kind"] == "EXIT")
    last = pair[pair.index(exit_)]
    base = (last.record["event_time"] + 3_600_000) * 1000

    def after(sequence: int) -> list:
        again = replace(
            last, offset=10_000, record={**last.record, "kind": "ENTER", "sequence": sequence, "transition_id": "later"}
        )
        return [*pair[: pair.index(exit_) + 1], again]

    assert repeated_or_out_of_sequence(after(base + 1)) == []
    assert any("follows" in p for p in repeated_or_out_of_sequence(after(base + 2)))
