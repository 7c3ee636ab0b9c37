"""Issue 20.6: over-segmentation warnings. `validate`'s static ones (udfs/definition_warnings.py)
on small hand-made files, checked against what a backtest then shows; `backtest`'s behavioural
ones (jobs/segment_warnings.py) on hand-made logs whose figures are worked out in each test, the
thresholds honoured; and one run over the shipped definitions and generated traffic whose
warnings are recomputed independently from the transitions it writes."""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations

import pytest

from jobs.backtest import EventLog, run_backtest
from jobs.cli import main as cli_main
from jobs.segment_warnings import FLAPPING, OVERLAP, TOO_SMALL, WarningThresholds, behaviour_warnings
from jobs.settings import SHIPPED_DEFINITIONS, SettingsError, load_settings
from tests.conftest import START_MS
from udfs.definition_warnings import IDENTICAL, NEVER_ENTERED, definition_warnings
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.profile_config import HOUR_MS, MINUTE_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events

T0 = START_MS


def defs(segments: str, groups: str = "") -> str:
    return "version: v1\nsegments:\n" + segments + (f"exclusive_groups:\n{groups}" if groups else "")


def static(text: str) -> set[tuple[str, tuple[str, ...]]]:
    return {(w.kind, w.segments) for w in definition_warnings(parse_definitions(text))}


def page(user: str, n: int, ts: int) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, "page_view", ts)


def add(user: str, n: int, ts: int, quantity: int = 1) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, "add_to_cart", ts, product_id="p", quantity=quantity, price=1.0)


# -- validate: static -------------------------------------------------------------------------------


def test_two_segments_with_the_same_condition_written_differently_are_identical():
    # Operands swapped, the `and` reordered, 10m written in ms: the same test of the same values.
    text = defs(
        "  - name: a\n    when: cart_items > 0 and ms_since_last_event < 10m\n"
        "  - name: b\n    when: 600000 > ms_since_last_event and 0 < cart_items\n"
        "  - name: alias\n    when: segment.a\n"
    )
    assert static(text) == {(IDENTICAL, ("a", "b")), (IDENTICAL, ("a", "alias"))}


def test_the_same_condition_with_another_dwell_or_exit_or_in_a_group_is_not_identical():
    assert static(defs("  - name: a\n    when: cart_items > 0\n  - name: b\n    when: cart_items > 1\n")) == set()
    dwell = defs(
        "  - name: a\n    when: cart_items > 0\n  - name: b\n    when: cart_items > 0\n    min_dwell: 1h\n"
        "  - name: c\n    enter: cart_items > 2\n    exit: cart_items < 1\n"
        "  - name: d\n    enter: cart_items > 2\n    exit: cart_items < 2\n"
    )
    # b stays an hour after a leaves; c and d leave at different counts.
    assert static(dwell) == set()
    # Two members of a group with the same entry: the first wins, so their members differ.
    grouped = defs(
        "  - name: a\n    when: cart_items > 0\n  - name: b\n    when: cart_items > 0\n  - name: c\n    when: true\n",
        "  - name: g\n    segments: [c, a]\n",
    )
    assert (IDENTICAL, ("a", "b")) not in static(grouped)


@pytest.mark.parametrize(
    "condition, never",
    [
        ("cart_items > 5 and cart_items < 3", True),
        ("cart_items > 3 and cart_items <= 3", True),
        ("cart_items >= 3 and cart_items <= 3", False),  # exactly 3
        ("cart_items > 3 and cart_items < 5", False),
        ("cart_items > 5 and ms_since_last_event < 1m and cart_items < 3", True),
        ("cart_items > 5 and cart_items < 3 or ms_since_last_event < 1m", False),  # the `or` can hold
        ("false", True),
        ("not (cart_items > 5 and cart_items < 3)", False),  # not shown either way: no warning
    ],
)
def test_a_condition_that_can_never_hold_is_warned(condition, never):
    text = defs(f"  - name: s\n    when: {condition}\n")
    assert static(text) == ({(NEVER_ENTERED, ("s",))} if never else set())


def test_a_segment_reading_a_segment_no_one_can_enter_is_warned_too():
    text = defs(
        "  - name: uses\n    when: segment.empty or false\n"
        "  - name: empty\n    when: cart_items > 5 and cart_items < 3\n"
        "  - name: negates\n    when: not segment.empty\n"
    )
    assert static(text) == {(NEVER_ENTERED, ("uses",)), (NEVER_ENTERED, ("empty",))}


def test_a_group_member_whose_entry_implies_an_earlier_members_entry_is_never_entered():
    # `big` (> 3 items and active) implies `some` (> 2 items): `some` comes first and wins.
    segments = (
        "  - name: some\n    when: cart_items > 2\n"
        "  - name: big\n    when: cart_items > 3 and ms_since_last_event < 1h\n"
        "  - name: rest\n    when: true\n"
    )
    shadowed = defs(segments, "  - name: g\n    segments: [some, big, rest]\n")
    assert static(shadowed) == {(NEVER_ENTERED, ("big",))}
    assert static(defs(segments, "  - name: g\n    segments: [big, some, rest]\n")) == set()
    # `rest` (true) before the others: neither can ever win.
    first = defs(segments, "  - name: g\n    segments: [rest, big, some]\n")
    assert static(first) == {(NEVER_ENTERED, ("big",)), (NEVER_ENTERED, ("some",))}
    # What the backtest shows: a user with 4 items and one with 3 enter `some`, nobody `big`.
    events = [add("u1", 1, T0, quantity=4), add("u2", 1, T0, quantity=3), page("u3", 1, T0)]
    result = run_backtest(parse_definitions(shadowed), EventLog("log", events), until_ms=T0 + MINUTE_MS)
    assert (result.segments["some"].entries, result.segments["big"].entries) == (2, 0)
    assert result.final_members["rest"] == {"u3"}


def test_the_shipped_definitions_have_no_static_warning():
    # None of its segments can be shown empty or equal to another from the text; tier_low
    # (`true`) is its group's last member.
    assert definition_warnings(Segmentation.load(SHIPPED_DEFINITIONS).definitions) == []


def test_cli_validate_prints_warnings_with_the_line_and_strict_makes_them_fail(tmp_path, capsys):
    path = tmp_path / "d.yaml"
    path.write_text(defs("  - name: a\n    when: cart_items > 0\n  - name: b\n    when: 0 < cart_items\n"))
    assert cli_main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {path}:3: a & b: always the same members" in out
    assert cli_main(["validate", "--strict", str(path)]) == 3
    capsys.readouterr()
    path.write_text(ACTIVE)
    assert cli_main(["validate", "--strict", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


# -- backtest: behaviour ----------------------------------------------------------------------------

ACTIVE = defs("  - name: active\n    when: ms_since_last_event < 10m\n")


def warnings_of(text: str, events: list[UserEvent], until_ms: int, **thresholds) -> set:
    limits = WarningThresholds(**thresholds)
    result = run_backtest(
        parse_definitions(text), EventLog("log", events), until_ms, flap_window_ms=limits.flap_window_ms
    )
    return {(w.kind, w.segments) for w in behaviour_warnings(result, limits)}


def test_a_healthy_segment_has_no_warning():
    # 20 users, one event each at the same instant: 20 members at the peak (100% of the users),
    # one entry each and no re-entry, and no other segment to overlap with.
    events = [page(f"u{i}", 1, T0) for i in range(20)]
    assert warnings_of(ACTIVE, events, T0 + HOUR_MS) == set()


def test_two_segments_with_the_same_condition_overlap_fully_and_the_threshold_is_honoured():
    text = defs(
        "  - name: active\n    when: ms_since_last_event < 10m\n"
        "  - name: also_active\n    when: ms_since_last_event < 600000\n"
        "  - name: longer\n    when: ms_since_last_event < 11m\n"
        "  - name: much_longer\n    when: ms_since_last_event < 20m\n"
    )
    events = [page(f"u{i}", 1, T0 + i * MINUTE_MS) for i in range(20)]
    # Each user: active and also_active [t, t+10m), longer [t, t+11m), much_longer [t, t+20m).
    # Jaccard: active/also 1.0; active/longer 10/11 = 0.909; longer/much_longer 11/20; active/
    # much_longer 10/20.
    found = {w for w in warnings_of(text, events, T0 + 2 * HOUR_MS) if w[0] == OVERLAP}
    assert found == {
        (OVERLAP, ("active", "also_active")),
        (OVERLAP, ("active", "longer")),
        (OVERLAP, ("also_active", "longer")),
    }
    stricter = {w for w in warnings_of(text, events, T0 + 2 * HOUR_MS, max_overlap=0.95) if w[0] == OVERLAP}
    assert stricter == {(OVERLAP, ("active", "also_active"))}
    looser = {w for w in warnings_of(text, events, T0 + 2 * HOUR_MS, max_overlap=0.5) if w[0] == OVERLAP}
    assert len(looser) == 6  # every pair: the lowest index is 10/20 = 0.5


def test_a_segment_that_comes_and_goes_every_quarter_hour_flaps_and_the_window_is_honoured():
    # 20 users with an event every 15 minutes for 10 events: active [15k, 15k + 10m), so each
    # exit is followed 5 minutes later by a re-entry: 10 entries, 9 of them flaps (rate 0.9).
    events = [page(f"u{i}", n, T0 + n * 15 * MINUTE_MS) for n in range(10) for i in range(20)]
    until = T0 + 4 * HOUR_MS
    assert warnings_of(ACTIVE, events, until) == {(FLAPPING, ("active",))}
    assert warnings_of(ACTIVE, events, until, max_flap_rate=0.9) == set()  # 0.9 is not above 0.9
    assert warnings_of(ACTIVE, events, until, flap_window_ms=5 * MINUTE_MS) == set()  # 5 min: not less
    assert warnings_of(ACTIVE, events, until, flap_window_ms=5 * MINUTE_MS + 1) == {(FLAPPING, ("active",))}


def test_a_segment_too_small_to_act_on_and_both_size_thresholds_are_honoured():
    # 30 users with an event; 3 of them add to the cart: `cart` peaks at 3 members (10%).
    text = defs("  - name: active\n    when: ms_since_last_event < 10m\n  - name: cart\n    when: cart_items > 0\n")
    events = [page(f"u{i}", 1, T0) for i in range(30)] + [add(f"u{i}", 2, T0 + MINUTE_MS) for i in range(3)]
    until = T0 + 5 * MINUTE_MS  # before anyone's activity lapses
    assert warnings_of(text, events, until) == {(TOO_SMALL, ("cart",))}  # 3 < 10 members
    assert warnings_of(text, events, until, min_members=3) == set()  # 3 is not below 3; 10% > 1%
    assert warnings_of(text, events, until, min_members=3, min_share=0.11) == {(TOO_SMALL, ("cart",))}
    assert warnings_of(text, events, until, min_members=0, min_share=0.1) == set()
    # Never entered at all: too small, at 0 members.
    assert (TOO_SMALL, ("cart",)) in warnings_of(text, events[:30], until)


@pytest.mark.parametrize(
    "flag, value",
    [("--max-overlap", "0"), ("--max-overlap", "1.5"), ("--min-share", "-0.1"), ("--min-members", "-1")],
)
def test_cli_backtest_refuses_thresholds_out_of_range(tmp_path, capsys, flag, value):
    log, path = tmp_path / "log.jsonl", tmp_path / "d.yaml"
    log.write_text(json.dumps(page("u", 1, T0).to_record()) + "\n")
    path.write_text(ACTIVE)
    assert cli_main(["backtest", str(path), "--events", str(log), "--quiet", flag, value]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_backtest_prints_and_writes_the_warnings_and_strict_makes_them_fail(tmp_path, capsys):
    log, path = tmp_path / "log.jsonl", tmp_path / "d.yaml"
    log.write_text("".join(json.dumps(page(f"u{i}", 1, T0).to_record()) + "\n" for i in range(3)))
    path.write_text(ACTIVE)
    args = ["backtest", str(path), "--events", str(log), "--quiet", "--until", str(T0 + HOUR_MS)]
    assert cli_main([*args, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "warning: active: too small to act on: at most 3 members" in out
    warnings = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert [(w["kind"], w["segments"], w["value"], w["threshold"]) for w in warnings] == [
        (TOO_SMALL, ["active"], 3, 10)
    ]
    assert cli_main([*args, "--strict"]) == 3
    assert cli_main([*args, "--strict", "--min-members", "3", "--flap-window", "30s"]) == 0
    assert "no over-segmentation warnings for v1" in capsys.readouterr().out


# -- the shipped definitions over generated traffic -----------------------------------------------


def _independent_figures(records: list[dict], end_ms: int):
    """From the written transitions alone: each segment's member-time and each pair's shared
    member-time (a walk through each user's timeline, summing the time between consecutive
    transitions for every segment and pair the user is in), and each segment's re-entries less
    than 10 minutes after the same user's exit."""
    alone: dict[str, int] = defaultdict(int)
    shared: dict[tuple[str, str], int] = defaultdict(int)
    entries: dict[str, int] = defaultdict(int)
    flaps: dict[str, int] = defaultdict(int)
    by_user: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_user[r["user_id"]].append(r)
    for timeline in by_user.values():
        timeline.sort(key=lambda r: r["event_time"])  # stable: at one instant, the emitted order
        inside: set[str] = set()
        left_at: dict[str, int] = {}
        now = timeline[0]["event_time"]
        for r in [*timeline, None]:
            t = end_ms if r is None else r["event_time"]
            for s in inside:
                alone[s] += t - now
            for pair in combinations(sorted(inside), 2):
                shared[pair] += t - now
            now = t
            if r is None:
                break
            if r["kind"] == "ENTER":
                entries[r["segment"]] += 1
                if r["segment"] in left_at and t - left_at[r["segment"]] < 10 * MINUTE_MS:
                    flaps[r["segment"]] += 1
                inside.add(r["segment"])
            else:
                inside.discard(r["segment"])
                left_at[r["segment"]] = t
    jaccard = {(a, b): n / (alone[a] + alone[b] - n) for (a, b), n in shared.items() if n}
    return jaccard, {s: flaps[s] / entries[s] for s in entries}


def test_the_shipped_definitions_over_a_generated_day_warn_consistently(tmp_path, capsys):
    log = tmp_path / "day.jsonl"
    with open(log, "w") as f:
        for event in generate_events(200, 3, T0, 24 * HOUR_MS):
            f.write(json.dumps(event.to_record()) + "\n")
    out_json, out_transitions = tmp_path / "r.json", tmp_path / "t.jsonl"
    code = cli_main(
        [
            "backtest",
            str(SHIPPED_DEFINITIONS),
            "--events",
            str(log),
            "--quiet",
            "--json",
            str(out_json),
            "--transitions",
            str(out_transitions),
        ]
    )
    assert code == 0  # warnings do not fail the run without --strict
    figures = json.loads(out_json.read_text())
    warnings = figures["warnings"]
    printed = capsys.readouterr().out
    assert all(f"warning: {w['message']}" in printed for w in warnings)
    records = [json.loads(line) for line in out_transitions.read_text().splitlines()]
    # Open stays count up to the end of the run: the later of --until (here the watermark) and
    # the last transition (events of the last watermark_lag_ms come after the watermark).
    end_ms = max(figures["until_ms"], *(r["event_time"] for r in records))
    jaccard, flap_rate = _independent_figures(records, end_ms)

    warned_pairs = {tuple(w["segments"]) for w in warnings if w["kind"] == OVERLAP}
    assert warned_pairs == {pair for pair, index in jaccard.items() if index >= 0.9}
    for w in warnings:
        if w["kind"] == OVERLAP:
            assert w["value"] == pytest.approx(jaccard[tuple(w["segments"])])
    warned_flapping = {w["segments"][0] for w in warnings if w["kind"] == FLAPPING}
    assert warned_flapping == {s for s, rate in flap_rate.items() if rate > 0.1}
    users = figures["events"]["users"]
    least = max(10, 0.01 * users)
    warned_small = {w["segments"][0] for w in warnings if w["kind"] == TOO_SMALL}
    assert warned_small == {s for s, f in figures["segments"].items() if f["peak_size"] < least}
    # Each kind shows up on this traffic, so none of the comparisons above is vacuous.
    assert {w["kind"] for w in warnings} == {TOO_SMALL, OVERLAP, FLAPPING}


# -- the thresholds in the settings file ------------------------------------------------------------


def test_the_settings_files_warnings_section_sets_the_thresholds_and_a_flag_wins(tmp_path, capsys):
    log, path, config = tmp_path / "log.jsonl", tmp_path / "d.yaml", tmp_path / "settings.yaml"
    log.write_text("".join(json.dumps(page(f"u{i}", 1, T0).to_record()) + "\n" for i in range(3)))
    path.write_text(ACTIVE)
    args = ["backtest", str(path), "--events", str(log), "--quiet", "--until", str(T0 + HOUR_MS), "--strict"]
    # 3 members at the peak: warned under the default 10, not under the file's 3, again under the flag's 4.
    config.write_text("job_name: x\n")
    assert cli_main([*args, "--config", str(config)]) == 3
    config.write_text("warnings:\n  min_members: 3\n  flap_window: 30s\n")
    assert cli_main([*args, "--config", str(config)]) == 0
    assert cli_main([*args, "--config", str(config), "--min-members", "4"]) == 3
    capsys.readouterr()


def test_the_warnings_section_is_read_strictly():
    assert load_warnings({"flap_window": "30s", "max_overlap": 1}) == WarningThresholds(
        max_overlap=1.0, flap_window_ms=30_000
    )
    for raw, message in [
        ({"min_member": 3}, "unknown threshold 'min_member'"),
        ({"min_members": "3"}, "min_members must be an integer"),
        ({"min_members": True}, "min_members must be an integer"),
        ({"max_overlap": 2}, "max_overlap must lie between 0 and 1"),
        ({"flap_window": "ten minutes"}, "expected a duration"),
        ({"flap_window": 0}, "flap_window_ms must be positive"),
        ([1, 2], "must be a mapping"),
    ]:
        with pytest.raises(SettingsError, match=message):
            load_warnings(raw)
    with pytest.raises(SettingsError, match="SEGMENTS_WARNINGS"):
        load_settings(environ={"SEGMENTS_WARNINGS": "{}"})


def load_warnings(raw) -> WarningThresholds:
    import tempfile
    from pathlib import Path

    import yaml

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "settings.yaml"
        path.write_text(yaml.safe_dump({"warnings": raw}))
        return load_settings(path, environ={}).warnings


def test_warnings_refuse_a_backtest_that_counted_flaps_with_another_window():
    result = run_backtest(parse_definitions(ACTIVE), EventLog("log", [page("u", 1, T0)]), T0 + MINUTE_MS)
    with pytest.raises(ValueError, match="counted flaps within 600000 ms"):
        behaviour_warnings(result, WarningThresholds(flap_window_ms=MINUTE_MS))
