"""The live view's pure parts (jobs/live_view.py): the flap and latency tally of committed
transitions, the top movers of a size history, the warnings and the Prometheus text."""

from __future__ import annotations

import random
import re

import pytest

from jobs.live_view import (
    EXPORTED_METRICS,
    LiveFigures,
    SegmentFigures,
    SizeSample,
    live_warnings,
    tally,
    top_movers,
)

MIN = 60_000
WINDOW = 10 * MIN
T0 = 1_700_000_000_000


def test_a_reentry_within_the_window_after_the_same_users_exit_is_a_flap():
    batch = [
        ("ann", "cart", "ENTER", T0),
        ("ann", "cart", "EXIT", T0 + MIN),
        ("ann", "cart", "ENTER", T0 + 5 * MIN),  # 4 min after her exit: a flap
        ("bob", "cart", "ENTER", T0 + 5 * MIN),  # never left: not a flap
        ("ann", "active", "ENTER", T0 + 5 * MIN),  # another segment: not a flap
        ("ann", "cart", "EXIT", T0 + 6 * MIN),
        ("ann", "cart", "ENTER", T0 + 16 * MIN),  # exactly the window after: not a flap (as the backtest)
    ]
    counted = tally(batch, {}, WINDOW, now_ms=T0 + 16 * MIN)
    assert {k: v for k, v in counted.increments.items() if not k.startswith("latency")} == {
        "entries:cart": 4,
        "exits:cart": 2,
        "flaps:cart": 1,
        "entries:active": 1,
    }
    assert counted.exits == {"cart": {"ann": T0 + 6 * MIN}}
    assert counted.newest_event_ms == T0 + 16 * MIN


def test_an_exit_stored_from_an_earlier_batch_makes_a_flap():
    counted = tally([("ann", "cart", "ENTER", T0 + 3 * MIN)], {("cart", "ann"): T0}, WINDOW, now_ms=T0 + 3 * MIN)
    assert counted.increments["flaps:cart"] == 1
    counted = tally([("ann", "cart", "ENTER", T0 + 30 * MIN)], {("cart", "ann"): T0}, WINDOW, now_ms=T0 + 30 * MIN)
    assert "flaps:cart" not in counted.increments


def test_the_flaps_do_not_depend_on_how_the_transitions_are_batched():
    """The follower tallies a partition batch by batch with the exits stored in between: any split
    of a sequence counts the flaps of the whole."""
    rng = random.Random(7)
    transitions, inside, clock = [], set(), T0
    for _ in range(400):
        clock += rng.randrange(0, 8 * MIN)
        user, segment = rng.choice("abcde"), rng.choice(("x", "y"))
        kind = "EXIT" if (user, segment) in inside else "ENTER"
        inside ^= {(user, segment)}
        transitions.append((user, segment, kind, clock))
    whole = tally(transitions, {}, WINDOW, now_ms=clock)
    assert whole.increments["flaps:x"] + whole.increments["flaps:y"] > 0
    stored: dict[tuple[str, str], int] = {}
    flaps = {"x": 0, "y": 0}
    start = 0
    while start < len(transitions):
        end = start + rng.randrange(1, 30)
        part = tally(transitions[start:end], stored, WINDOW, now_ms=clock)
        for segment in flaps:
            flaps[segment] += part.increments.get(f"flaps:{segment}", 0)
        stored.update({(s, u): at for s, users in part.exits.items() for u, at in users.items()})
        start = end
    assert flaps == {"x": whole.increments["flaps:x"], "y": whole.increments["flaps:y"]}


def test_the_latency_of_each_transition_lands_in_its_bucket():
    batch = [
        ("ann", "cart", "ENTER", T0 - 2_000),
        ("bob", "cart", "ENTER", T0 - 400),
        ("cy", "cart", "EXIT", T0 - 2 * 3_600_000),
    ]
    counted = tally(batch, {}, WINDOW, now_ms=T0)
    latency = {k: v for k, v in counted.increments.items() if k.startswith("latency")}
    assert latency == {
        "latency_bucket:2.5": 1,
        "latency_bucket:0.5": 1,
        "latency_bucket:+Inf": 1,
        "latency_count": 3,
        "latency_sum_ms": 2_000 + 400 + 7_200_000,
    }


def test_top_movers_compare_the_first_and_last_samples_largest_change_first():
    history = [
        SizeSample(T0, {"a": 10, "b": 5, "c": 7, "gone": 4}),
        SizeSample(T0 + MIN, {"a": 50, "b": 5, "c": 0, "gone": 4}),
        SizeSample(T0 + 2 * MIN, {"a": 12, "b": 5, "c": 1, "new": 3}),
    ]
    movers = [(m.segment, m.before, m.now, m.change) for m in top_movers(history)]
    assert movers == [("c", 7, 1, -6), ("gone", 4, 0, -4), ("new", 0, 3, 3), ("a", 10, 12, 2)]
    assert [m.segment for m in top_movers(history, limit=2)] == ["c", "gone"]
    assert top_movers(history[:1]) == []


def test_live_warnings_name_the_small_and_the_flapping_segments():
    figures = LiveFigures(
        [
            SegmentFigures("small", members=3, entries=10, exits=7, flaps=0),
            SegmentFigures("flappy", members=40, entries=20, exits=5, flaps=5),
            SegmentFigures("fine", members=40, entries=20, exits=5, flaps=1),
            SegmentFigures("removed", members=0, entries=2, exits=2, flaps=0),
        ],
        {},
        0,
        0,
    )
    warned = {(w["kind"], w["segments"][0]) for w in live_warnings(figures, ["small", "flappy", "fine"], 10, 0.1)}
    assert warned == {("too_small", "small"), ("flapping", "flappy")}


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """(family -> type, (sample name, labels) -> value) of a Prometheus text exposition."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            match = re.fullmatch(r'([a-z_]+)(\{(?:[a-z]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)', line)
            assert match, f"not an exposition line: {line!r}"
            samples[(match[1], match[2] or "")] = float(match[3])
    return types, samples


def test_the_prometheus_text_has_every_family_cumulative_buckets_and_escaped_labels():
    figures = LiveFigures(
        [SegmentFigures('odd"name\\', members=4, entries=9, exits=5, flaps=2)],
        {"0.5": 3, "5": 2, "+Inf": 1},
        latency_sum_ms=12_500,
        latency_count=6,
    )
    types, samples = parse_exposition(figures.prometheus())
    assert types == {
        "segments_segment_members": "gauge",
        "segments_segment_entries_total": "counter",
        "segments_segment_exits_total": "counter",
        "segments_segment_flaps_total": "counter",
        "segments_transition_latency_seconds": "histogram",
    }
    assert set(types) == set(EXPORTED_METRICS)
    label = '{segment="odd\\"name\\\\"}'
    assert samples[("segments_segment_members", label)] == 4
    assert samples[("segments_segment_entries_total", label)] == 9
    assert samples[("segments_segment_exits_total", label)] == 5
    assert samples[("segments_segment_flaps_total", label)] == 2
    buckets = {labels: n for (name, labels), n in samples.items() if name.endswith("_bucket")}
    assert buckets['{le="0.25"}'] == 0
    assert buckets['{le="0.5"}'] == buckets['{le="2.5"}'] == 3
    assert buckets['{le="5"}'] == buckets['{le="3600"}'] == 5
    assert buckets['{le="+Inf"}'] == 6
    assert samples[("segments_transition_latency_seconds_sum", "")] == pytest.approx(12.5)
    assert samples[("segments_transition_latency_seconds_count", "")] == 6
