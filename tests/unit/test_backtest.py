"""`segments backtest` and `segments validate`: log readers, the per-segment figures worked out by
hand on small logs, the diff between versions, and the outputs (table, HTML, JSON, exit codes)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree

import fastavro
import pytest

from jobs import backtest
from jobs.backtest import EventLog, compare, run_backtest
from jobs.cli import main as cli_main
from tests.conftest import START_MS
from udfs.codec import SCHEMAS_DIR, load_schema_file
from udfs.definitions import parse_definitions
from udfs.events import UserEvent
from udfs.profile_config import MINUTE_MS

T0 = START_MS

ACTIVE = """
version: v1
segments:
  - name: active
    when: ms_since_last_event < 10m
"""


def page(user: str, n: int, ts: int) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, "page_view", ts)


def test_figures_of_a_small_log_worked_out_by_hand():
    # u1: events at 0 and 25m -> active [0, 10m) and [25m, 35m): two entries, dwell 10m each,
    #     and the re-entry 15 min after the exit is not a flap (window 10 min).
    # u2: events at 3m and 16m -> active [3m, 13m) and [16m, 26m): re-entry 3 min after the
    #     exit: one flap. Until 40m: everyone has left.
    events = [
        page("u1", 1, T0),
        page("u2", 1, T0 + 3 * MINUTE_MS),
        page("u2", 2, T0 + 16 * MINUTE_MS),
        page("u1", 2, T0 + 25 * MINUTE_MS),
    ]
    result = run_backtest(parse_definitions(ACTIVE), EventLog("log", events), until_ms=T0 + 40 * MINUTE_MS)
    r = result.segments["active"]
    assert (r.entries, r.exits, r.final_size, r.peak_size) == (4, 4, 0, 2)
    assert r.median_dwell_ms == 10 * MINUTE_MS
    assert r.flaps == 1 and r.flap_rate == 0.25
    assert (result.events_applied, result.users) == (4, 2)
    # Sizes over time: 2 members between 3m and 10m, none at the end.
    assert max(v for _, v in result.sizes["active"]) == 2
    assert result.sizes["active"][-1][1] == 0


@pytest.mark.parametrize("gap_ms, flap", [(10 * MINUTE_MS - 1, True), (10 * MINUTE_MS, False)])
def test_a_flap_is_a_re_entry_less_than_ten_minutes_after_the_exit(gap_ms, flap):
    """Issue 16: the window is strict: a re-entry exactly 10 minutes after the exit is no flap."""
    # active [0, 10m), exit at 10m; the next event at 10m + gap re-enters.
    events = [page("u1", 1, T0), page("u1", 2, T0 + 10 * MINUTE_MS + gap_ms)]
    result = run_backtest(parse_definitions(ACTIVE), EventLog("log", events), until_ms=T0 + 60 * MINUTE_MS)
    r = result.segments["active"]
    assert (r.entries, r.flaps) == (2, 1 if flap else 0)


def test_a_stay_that_begins_and_ends_at_one_millisecond_counts_once_with_zero_dwell_and_no_flap():
    """Issue 16: `when: cart_items > 0`; an add_to_cart and a purchase of one user at the same ms,
    beside another user leaving at that ms while a third enters."""
    cart = "version: v1\nsegments:\n  - name: cart\n    when: cart_items > 0\n"
    events = [
        UserEvent("x1", "x", "add_to_cart", T0, product_id="p"),
        UserEvent("z1", "z", "add_to_cart", T0 + MINUTE_MS, product_id="p"),
        UserEvent("a", "u", "add_to_cart", T0 + 2 * MINUTE_MS, product_id="p"),
        UserEvent("b", "u", "purchase", T0 + 2 * MINUTE_MS, price=5.0),
        UserEvent("x2", "x", "purchase", T0 + 3 * MINUTE_MS, price=1.0),
        UserEvent("y1", "y", "add_to_cart", T0 + 3 * MINUTE_MS, product_id="p"),
    ]
    result = run_backtest(parse_definitions(cart), EventLog("log", events), until_ms=T0 + 10 * MINUTE_MS)
    r = result.segments["cart"]
    # x [0, 3m), z [1m, -), u [2m, 2m], y [3m, -): at most x, z and u at once (u's zero-length
    # stay counts); at 3m x leaves before y enters, so never four.
    assert (r.entries, r.exits, r.final_size, r.peak_size) == (4, 2, 2, 3)
    assert r.median_dwell_ms == (0 + 3 * MINUTE_MS) / 2
    assert r.flaps == 0


def test_until_defaults_to_the_watermark_the_job_reaches_and_late_events_are_left_out():
    lag, lateness = 5_000, 60_000
    events = [
        page("u1", 1, T0),
        page("u2", 1, T0 + 30 * MINUTE_MS),
        page("u1", 2, T0 + 30 * MINUTE_MS - lag - 1 - lateness - 1),  # behind watermark - lateness
        page("u1", 3, T0 + 30 * MINUTE_MS - lag - 1 - lateness),
    ]  # exactly at the bound: kept
    result = run_backtest(
        parse_definitions(ACTIVE), EventLog("log", events), watermark_lag_ms=lag, allowed_lateness_ms=lateness
    )
    assert result.until_ms == T0 + 30 * MINUTE_MS - lag - 1
    assert (result.late, result.events_applied) == (1, 3)


def test_duplicates_are_counted_once():
    events = [page("u1", 1, T0), page("u1", 1, T0), page("u1", 2, T0 + MINUTE_MS)]
    result = run_backtest(parse_definitions(ACTIVE), EventLog("log", events), until_ms=T0 + 2 * MINUTE_MS)
    assert (result.duplicates, result.events_applied, result.segments["active"].entries) == (1, 2, 1)


def test_overlap_counts_users_in_both_segments_at_the_end():
    definitions = parse_definitions("""
version: v1
segments:
  - name: active
    when: ms_since_last_event < 10m
  - name: carted
    when: cart_items > 0
""")
    events = [
        page("u1", 1, T0),
        UserEvent("u2-1", "u2", "add_to_cart", T0, product_id="p", quantity=1, price=2.0),
        UserEvent("u3-1", "u3", "add_to_cart", T0 - 20 * MINUTE_MS, product_id="p", quantity=1, price=2.0),
    ]
    # u3's event comes last in the log, 20 min behind: within the lateness allowed here.
    result = run_backtest(
        definitions, EventLog("log", events), until_ms=T0 + MINUTE_MS, allowed_lateness_ms=30 * MINUTE_MS
    )
    assert result.final_members == {"active": {"u1", "u2"}, "carted": {"u2", "u3"}}
    assert result.overlap == {("active", "carted"): 1}


def test_the_diff_between_two_versions_names_what_changed():
    old = parse_definitions(ACTIVE)
    new = parse_definitions(ACTIVE.replace("v1", "v2").replace("10m", "20m"))
    # u1 at 0 and 15m: under 10m it leaves at 10m and re-enters at 15m; under 20m it stays.
    events = [page("u1", 1, T0), page("u1", 2, T0 + 15 * MINUTE_MS)]
    log = EventLog("log", events)
    a = run_backtest(old, log, until_ms=T0 + 30 * MINUTE_MS)
    b = run_backtest(new, log, until_ms=T0 + 30 * MINUTE_MS)
    [d] = compare(a, b)
    assert d.name == "active"
    assert d.entries == (2, 1)
    assert d.final_size == (0, 1)  # at 30m: gone under 10m (left at 25m), still in under 20m (until 35m)
    assert (d.only_in_base, d.only_in_other) == (0, 1)
    # old: ENTER 0, EXIT 10m, ENTER 15m, EXIT 25m; new: ENTER 0. Differing: 3 of old's.
    assert d.transitions_differing == 3
    assert "v1 -> v2" in "\n".join(backtest.diff_lines(a, b, [d]))


def test_jsonl_reader_rejects_bad_lines_with_the_jobs_reasons(tmp_path):
    good = page("u1", 1, T0).to_record()
    lines = [
        json.dumps(good),
        "not json",
        json.dumps([1, 2]),
        json.dumps({**good, "user_id": ""}),
        json.dumps({**good, "event_id": "u1-2", "price": -1.0}),
        "",
        json.dumps({**good, "event_id": "u1-3"}),
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    log = backtest.read_events(str(path))
    assert [e.event_id for e in log.events] == ["u1-1", "u1-3"]
    assert log.rejected == {"undecodable": 2, "missing_user_id": 1, "invalid_field": 1}


def test_avro_container_files_are_read_and_other_record_types_refused(tmp_path):
    schema = fastavro.parse_schema(load_schema_file(SCHEMAS_DIR / "user_event.avsc"))
    events = [page("u1", 1, T0), page("u2", 1, T0 + 1)]
    path = tmp_path / "log.avro"
    with open(path, "wb") as f:
        fastavro.writer(f, schema, [e.to_record() for e in events])
    log = backtest.read_events(str(path))
    assert log.events == events
    other = tmp_path / "other.avro"
    with open(other, "wb") as f:
        fastavro.writer(f, fastavro.parse_schema({"type": "record", "name": "Other", "fields": []}), [{}])
    with pytest.raises(ValueError, match="not UserEvent"):
        backtest.read_events(str(other))


def test_html_report_is_well_formed_and_escapes_names(tmp_path):
    definitions = parse_definitions(ACTIVE)
    events = [page("u1", 1, T0), page("u2", 1, T0 + 3 * MINUTE_MS)]
    a = run_backtest(definitions, EventLog("<script>", events), until_ms=T0 + 20 * MINUTE_MS)
    page_html = backtest.html_report(a, a, compare(a, a))
    assert "<script>" not in page_html and "&lt;script&gt;" in page_html
    svg = page_html[page_html.index("<svg") : page_html.index("</svg>") + 6]
    root = ElementTree.fromstring(svg)
    [line] = list(root.iter("{http://www.w3.org/2000/svg}polyline"))
    points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(points) == backtest.SIZE_SAMPLES + 1 and all(map(math.isfinite, (c for p in points for c in p)))


def test_cli_backtest_writes_table_html_and_json(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(page(u, 1, T0 + i).to_record()) + "\n" for i, u in enumerate("abc")))
    defs = tmp_path / "d.yaml"
    defs.write_text(ACTIVE)
    other = tmp_path / "e.yaml"
    other.write_text(ACTIVE.replace("v1", "v2").replace("10m", "1m"))
    code = cli_main(
        [
            "backtest",
            str(defs),
            "--events",
            str(log),
            "--compare-with",
            str(other),
            "--quiet",
            "--html",
            str(tmp_path / "r.html"),
            "--json",
            str(tmp_path / "r.json"),
            "--until",
            "flush",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "active" in out and "diff: v1 -> v2" in out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["segments"]["active"]["entries"] == 3 and figures["segments"]["active"]["exits"] == 3
    assert figures["diff"][0]["entries"] == [3, 3]
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


def test_cli_backtest_writes_the_transitions_as_contract_records_in_jsonl_and_avro(tmp_path, capsys):
    """Issue 16: the transitions themselves, in the contract's schema, grouped by user and in
    each user's order; worked out by hand from ACTIVE (10 minutes) and the shorter v2 (1 minute)."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e.to_record()) + "\n" for e in [page("b", 1, T0), page("a", 1, T0 + MINUTE_MS)]))
    defs, other = tmp_path / "d.yaml", tmp_path / "e.yaml"
    defs.write_text(ACTIVE)
    other.write_text(ACTIVE.replace("v1", "v2").replace("10m", "1m"))
    args = ["backtest", str(defs), "--events", str(log), "--quiet", "--until", "flush"]
    assert (
        cli_main(
            [
                *args,
                "--transitions",
                str(tmp_path / "t.jsonl"),
                "--compare-with",
                str(other),
                "--compare-transitions",
                str(tmp_path / "t2.avro"),
            ]
        )
        == 0
    )
    assert cli_main([*args, "--transitions", str(tmp_path / "t.avro")]) == 0
    assert "transitions of v1: 4 in" in capsys.readouterr().out
    jsonl = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    with open(tmp_path / "t.avro", "rb") as f:
        reader = fastavro.reader(
            f, reader_schema=fastavro.parse_schema(load_schema_file(SCHEMAS_DIR / "segment_transition.avsc"))
        )
        avro = list(reader)
    for record in avro:  # the container file's reader turns timestamp-millis into datetimes
        for key in ("event_time", "emitted_at"):
            record[key] = int(record[key].timestamp() * 1000)
    assert avro == jsonl

    def brief(records):
        return [
            (
                r["user_id"],
                r["kind"],
                r["cause"],
                r["cause_event_id"],
                r["event_time"],
                r["emitted_at"],
                r["sequence"],
                r["definitions_version"],
                r["reason"]["rule"],
            )
            for r in records
        ]

    a0, b0 = (T0 + MINUTE_MS) * 1000, T0 * 1000
    assert brief(jsonl) == [
        ("a", "ENTER", "EVENT", "a-1", T0 + MINUTE_MS, T0 + MINUTE_MS, a0 + 1, "v1", "ms_since_last_event < 10m"),
        (
            "a",
            "EXIT",
            "TIMER",
            None,
            T0 + 11 * MINUTE_MS,
            T0 + 11 * MINUTE_MS,
            a0 + 2,
            "v1",
            "not (ms_since_last_event < 10m)",
        ),
        ("b", "ENTER", "EVENT", "b-1", T0, T0, b0 + 1, "v1", "ms_since_last_event < 10m"),
        (
            "b",
            "EXIT",
            "TIMER",
            None,
            T0 + 10 * MINUTE_MS,
            T0 + 10 * MINUTE_MS,
            b0 + 2,
            "v1",
            "not (ms_since_last_event < 10m)",
        ),
    ]
    assert jsonl[1]["reason"]["features"] == {"ms_since_last_event": 10 * MINUTE_MS}
    with open(tmp_path / "t2.avro", "rb") as f:
        assert [(r["user_id"], r["kind"], r["definitions_version"]) for r in fastavro.reader(f)] == [
            ("a", "ENTER", "v2"),
            ("a", "EXIT", "v2"),
            ("b", "ENTER", "v2"),
            ("b", "EXIT", "v2"),
        ]
    # Two runs over one log write the same bytes: they can be diffed.
    first = (tmp_path / "t.jsonl").read_bytes()
    assert cli_main([*args, "--transitions", str(tmp_path / "t.jsonl")]) == 0
    assert (tmp_path / "t.jsonl").read_bytes() == first
    assert cli_main([*args, "--compare-transitions", str(tmp_path / "t3.jsonl")]) == 2
    assert "needs --compare-with" in capsys.readouterr().err


def test_cli_validate_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(ACTIVE)
    bad.write_text(ACTIVE + "  - name: broken\n    when: count_purchse_24h > 1\n")
    assert cli_main(["validate", str(good)]) == 0
    assert "ok, version v1, 1 segments" in capsys.readouterr().out
    assert cli_main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:7:" in err and "segment 'broken'" in err and "count_purchase_24h" in err
    assert cli_main(["backtest", str(bad), "--events", str(good)]) == 1
