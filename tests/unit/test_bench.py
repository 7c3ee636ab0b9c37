"""The benchmark's pure helpers: percentiles, /proc parsing, markers, the Redis join, timestamp
stamping. (The benchmark itself is a command, not a test: `segments bench`.)"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from jobs.bench.latency_probes import stamp, timestamp_slot, zigzag_varint
from jobs.bench.markers import (
    END_MARKER_AGE_MS,
    PROGRESS_EVERY,
    PROGRESS_MARKER_PREFIX,
    START_MARKER,
    MarkerClock,
    classify_dead_letter,
    end_marker_events,
)
from jobs.bench.processes import busiest_threads, parse_proc_stat, parse_thread_stat, process_tree_ticks
from jobs.bench.report import figures, latency_summary, percentile, verdict
from jobs.bench.runs import LatencyResult, join_latencies, visible_at
from tests.conftest import START_MS
from udfs.events import UserEvent


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.0) == 1
    assert percentile([7], 0.99) == 7
    assert percentile([], 0.5) is None


def test_latency_summary():
    assert latency_summary([30.0, 10.0, 20.0]) == {"count": 3, "p50_ms": 20.0, "p99_ms": 30.0, "max_ms": 30.0}
    assert latency_summary([]) == {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}


def stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0) -> str:
    # Fields 1..17 of /proc/<pid>/stat, then the rest of a real line.
    fields = [
        str(pid),
        f"({comm})",
        "S",
        str(ppid),
        "1",
        "1",
        "0",
        "-1",
        "4194560",
        "100",
        "0",
        "0",
        "0",
        str(utime),
        str(stime),
        str(cutime),
        str(cstime),
        "20",
        "0",
        "12",
        "0",
        "1234",
    ]
    return " ".join(fields) + "\n"


def test_parse_proc_stat_counts_own_and_waited_children_cpu_and_survives_odd_names():
    assert parse_proc_stat(stat_line(42, "java", 7, 100, 20, 3, 4)) == (7, 127)
    # A command name with spaces and parentheses (field 2 is only delimited by the last ')').
    assert parse_proc_stat(stat_line(43, "my (odd) name) x", 42, 5, 6)) == (42, 11)


def test_process_tree_ticks_sums_descendants_only():
    stats = {
        10: stat_line(10, "python", 1, 100, 10),  # the measured process
        11: stat_line(11, "java", 10, 1000, 200),  # its child
        12: stat_line(12, "helper", 11, 5, 5),  # a grandchild
        20: stat_line(20, "other", 1, 9999, 9999),  # not ours
        21: "garbage",
    }
    assert process_tree_ticks(10, stats) == 110 + 1200 + 10
    assert process_tree_ticks(11, stats) == 1210
    assert process_tree_ticks(99, stats) == 0


def test_dead_letters_are_told_apart_as_start_markers_end_markers_or_neither(catalog):
    codec = catalog.codec("UserEvent")
    (_, marker), *_ = end_marker_events(1, START_MS - END_MARKER_AGE_MS)
    ordinary = UserEvent("e-1", "u1", "page_view", START_MS)

    def letter(payload: bytes, reason: str, partition: int = 0) -> dict:
        return {"payload": payload, "reason": reason, "source_partition": partition}

    assert classify_dead_letter(letter(START_MARKER, "bad_magic", 1), codec.decode) == ("start", "1")
    assert classify_dead_letter(letter(codec.encode(marker.to_record()), "late"), codec.decode) == (
        "end",
        marker.event_id,
    )
    assert classify_dead_letter(letter(codec.encode(ordinary.to_record()), "late"), codec.decode) is None
    (_, progress), *_ = end_marker_events(1, START_MS - END_MARKER_AGE_MS, f"{PROGRESS_MARKER_PREFIX}3-", 1)
    assert classify_dead_letter(letter(codec.encode(progress.to_record()), "late"), codec.decode) == (
        "progress",
        progress.event_id,
    )
    assert classify_dead_letter(letter(b"other garbage", "bad_magic"), codec.decode) is None
    assert classify_dead_letter(letter(b"other garbage", "late"), codec.decode) is None


def test_end_markers_cover_every_partition_with_distinct_users():
    markers = list(end_marker_events(2, 1_000))
    assert {p for p, _ in markers} == {0, 1}
    assert len({e.user_id for _, e in markers}) == len(markers)
    assert all(e.timestamp == 1_000 for _, e in markers)


def test_marker_clock_keeps_first_sightings_and_ends_when_all_end_markers_are_seen():
    clock = MarkerClock(start_markers=2, end_markers=2)
    clock.see("start", "0", 10.0)
    clock.see("start", "0", 11.0)  # a replay after a restart: the first sighting counts
    clock.see("start", "1", 12.0)
    assert clock.first_start == 10.0
    clock.see("end", "a", 20.0)
    assert not clock.all_ended and clock.last_end is None
    clock.see("end", "b", 25.0)
    assert clock.all_ended and clock.last_end == 25.0


def test_progress_counts_whole_steps_seen_on_every_partition():
    clock = MarkerClock(start_markers=2, end_markers=32)
    assert clock.see("progress", "bench-progress-1-0-0", 1.0)
    assert not clock.see("progress", "bench-progress-1-0-0", 2.0)
    assert clock.events_done(partitions=2) == 0
    clock.see("progress", "bench-progress-1-1-0", 3.0)
    assert clock.events_done(partitions=2) == PROGRESS_EVERY
    assert clock.events_done(partitions=1) == 2 * PROGRESS_EVERY


def test_thread_cpu_is_attributed_by_thread_name():
    line = "4242 (Segment users -) S 1 1 1 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 80 0 1234\n"
    assert parse_thread_stat(line) == ("Segment users -", 300)
    before = {1: ("Segment users -", 100), 2: ("GC Thread#0", 10)}
    after = {1: ("Segment users -", 600), 2: ("GC Thread#0", 30), 3: ("GC Thread#1", 40), 4: ("idle", 0)}
    ticks = os.sysconf("SC_CLK_TCK")
    assert busiest_threads(before, after) == [
        ("Segment users -", round(500 / ticks, 1)),
        ("GC Thread#1", round(40 / ticks, 1)),
        ("GC Thread#0", round(20 / ticks, 1)),
    ]


def test_visible_at_takes_the_first_sighting_of_that_sequence_or_a_later_one():
    seen = {("u1", "s"): [(3, 100.0), (5, 180.0)]}
    assert visible_at(seen, "u1", "s", 3) == 100.0
    assert visible_at(seen, "u1", "s", 2) == 100.0  # applied before 3 was
    assert visible_at(seen, "u1", "s", 4) == 180.0  # overwritten before the watcher read it
    assert visible_at(seen, "u1", "s", 6) is None
    assert visible_at(seen, "u2", "s", 1) is None


def test_join_latencies_measures_event_caused_transitions_of_the_window():
    committed = {
        (0, 0): {"user_id": "u1", "segment": "a", "sequence": 1, "event_time": 1_000, "cause": "EVENT"},  # warm-up
        (0, 1): {"user_id": "u1", "segment": "a", "sequence": 2, "event_time": 2_000, "cause": "EVENT"},
        (1, 0): {"user_id": "u2", "segment": "a", "sequence": 1, "event_time": 2_500, "cause": "TIMER"},
        (1, 1): {"user_id": "u2", "segment": "b", "sequence": 1, "event_time": 3_000, "cause": "EVENT"},
    }
    redis_seen = [["u1", "a", 1, 1_010.0], ["u1", "a", 2, 2_020.0], ["u2", "a", 1, 2_600.0]]
    kafka_seen = [[0, 0, 6_000.0], [0, 1, 7_000.0], [1, 0, 7_000.0], [1, 1, 8_000.0]]
    result = LatencyResult("x", 1.0, 1.0, 1.0)
    newest = join_latencies(result, committed, redis_seen, kafka_seen, window_start_ms=1_500, window_end_ms=4_000)
    assert newest == 2_000  # u2's event at 3,000 never showed in Redis
    assert result.event_caused_transitions == 2
    assert result.redis == {"count": 1, "p50_ms": 20.0, "p99_ms": 20.0, "max_ms": 20.0}
    assert result.redis_unmatched == 1
    assert result.kafka == {"count": 2, "p50_ms": 5_000.0, "p99_ms": 5_000.0, "max_ms": 5_000.0}


@pytest.mark.parametrize("value", [0, 1, -1, 63, 64, -65, 2**40, START_MS, -(2**63), 2**63 - 1])
def test_zigzag_varint_is_avro_long_encoding(value):
    import io

    import fastavro

    out = io.BytesIO()
    fastavro.schemaless_writer(out, "long", value)
    assert zigzag_varint(value) == out.getvalue()


def test_a_pre_encoded_event_stamped_with_a_new_timestamp_decodes_to_that_timestamp(catalog):
    codec = catalog.codec("UserEvent")
    event = UserEvent(
        "e-1",
        "u0000001",
        "add_to_cart",
        START_MS,
        session_id="s",
        product_id="p-1",
        price=9.5,
        quantity=2,
        properties={"q": "x"},
    )
    payload, offset, length = timestamp_slot(codec.encode, event.to_record())
    assert payload == codec.encode(event.to_record())
    stamped = stamp(payload, offset, length, START_MS + 123_456)
    assert codec.decode(stamped) == {**codec.decode(payload), "timestamp": START_MS + 123_456}
    assert codec.decode(stamped) == codec.decode(codec.encode(replace(event, timestamp=START_MS + 123_456).to_record()))
    with pytest.raises(ValueError):
        stamp(payload, offset, length, 5)  # a timestamp of another encoded length


def test_verdict():
    assert verdict(25_000, ">=", 20_000) == "pass"
    assert verdict(300, ">=", 20_000) == "MISS"
    assert verdict(80, "<=", 100) == "pass"
    assert verdict(None, "<=", 100) == "n/a"


def test_steady_rate_runs_from_the_first_step_past_half_seen_on_every_partition_to_the_last_end():
    events = 4 * PROGRESS_EVERY
    clock = MarkerClock(start_markers=2, end_markers=2)
    clock.see("start", "0", 0.0)
    for step, times in {1: (10.0, 11.0), 2: (20.0, 30.0), 3: (35.0, 36.0)}.items():
        for partition, at in enumerate(times):
            clock.see("progress", f"bench-progress-{step}-{partition}-0", at)
    assert clock.steady_rate(events, partitions=2) is None  # not ended yet
    clock.see("end", "a", 40.0)
    clock.see("end", "b", 50.0)
    # Step 2 (half of the events) was seen on both partitions at 30 s; the rest took 20 s.
    assert clock.steady_rate(events, partitions=2) == 2 * PROGRESS_EVERY / 20.0
    # A step not yet seen on every partition does not count: step 3 then.
    lagging = MarkerClock(start_markers=2, end_markers=1)
    lagging.see("progress", "bench-progress-2-0-0", 20.0)
    lagging.see("progress", "bench-progress-3-0-0", 30.0)
    lagging.see("progress", "bench-progress-3-1-0", 31.0)
    lagging.see("end", "a", 41.0)
    assert lagging.steady_rate(events, partitions=2) == PROGRESS_EVERY / 10.0


def _throughput(name: str, events_per_s: float, steady: float, slots: int = 1) -> dict:
    return {
        "name": name,
        "slots": slots,
        "events_per_s": events_per_s,
        "events_per_s_per_slot": events_per_s / slots,
        "steady_events_per_s": steady,
        "cpu_s_per_million_events": 1e6 / events_per_s,
        "cores_busy": 1.0,
        "startup_s": 10.0,
        "error": None,
    }


def test_the_table_sets_the_job_against_its_floor_and_the_per_slot_and_cpu_targets():
    results = {"throughput": [_throughput("job-p1", 1_200.0, 1_300.0), _throughput("floor-p1", 2_400.0, 2_000.0)]}
    rows = {r["figure"]: r for r in figures(results, checkpoint_interval_ms=5_000, cores=2)}
    assert rows["job (p1) / floor"]["value"] == 0.5
    assert rows["job (p1) / floor"]["verdict"] == "MISS"  # target >= 0.6x
    assert rows["job (p1) / floor, second half of the run"]["value"] == 0.65
    assert rows["job (p1) / floor, second half of the run"]["verdict"] == "pass"
    assert rows["full job, parallelism 1: events/s per slot"]["verdict"] == "MISS"  # target >= 1,500
    assert rows["job-p1: CPU seconds per 1M events"]["value"] == pytest.approx(833.3, abs=0.1)
    assert rows["job-p1: CPU seconds per 1M events"]["verdict"] == "MISS"  # target <= 800 s
    assert rows["floor-p1: CPU seconds per 1M events"]["verdict"] == ""  # no target for the floor


def test_a_run_on_single_slot_taskmanagers_is_set_against_parallelism_1():
    results = {
        "throughput": [
            _throughput("job-p1", 1_000.0, 1_000.0),
            _throughput("job-cluster-p2", 1_700.0, 1_700.0, slots=2),
        ]
    }
    rows = {r["figure"]: r for r in figures(results, checkpoint_interval_ms=5_000, cores=2)}
    assert rows["job-cluster-p2 (2 single-slot TaskManagers): events/s in all"]["value"] == 1_700.0
    ratio = rows["job-cluster-p2 / parallelism 1"]
    assert ratio["value"] == 1.7 and ratio["verdict"] == "pass" and ratio["target"] == ">= 1.6x"
    assert rows["job-cluster-p2: CPU seconds per 1M events"]["verdict"] == ""


def test_the_job_with_an_idle_control_stream_is_set_against_the_job_without_it_within_5_percent():
    results = {
        "throughput": [_throughput("job-p1", 1_000.0, 1_000.0), _throughput("job-p1-control-idle", 940.0, 940.0)]
    }
    rows = {r["figure"]: r for r in figures(results, checkpoint_interval_ms=5_000, cores=2)}
    assert rows["job (p1) with an idle control stream / without"]["value"] == 0.94
    assert rows["job (p1) with an idle control stream / without"]["verdict"] == "MISS"  # more than 5% lost
    cpu = rows["  CPU per event, with it / without"]
    assert cpu["value"] == pytest.approx(1_000 / 940) and cpu["verdict"] == "MISS"
    results["throughput"][1] = _throughput("job-p1-control-idle", 990.0, 990.0)
    rows = {r["figure"]: r for r in figures(results, checkpoint_interval_ms=5_000, cores=2)}
    assert rows["job (p1) with an idle control stream / without"]["verdict"] == "pass"


def test_each_part_of_the_floor_is_priced_by_the_run_without_it():
    floor, no_model = _throughput("floor-p1", 2_000.0, 2_000.0), _throughput("floor-p1-no-model", 2_500.0, 2_500.0)
    rows = {r["figure"]: r for r in figures({"throughput": [floor, no_model]}, checkpoint_interval_ms=5_000, cores=2)}
    # 500 us of CPU per event with the call, 400 without it: the call costs 100 us per event.
    assert rows["floor: the model call, CPU per event (floor - floor without it)"]["value"] == pytest.approx(100.0)
    assert "floor: the timer, CPU per event (floor - floor without it)" not in rows  # not run


def test_the_in_memory_core_is_set_against_its_targets_with_and_without_models():
    state = {
        "users": 281,
        "days": 7.0,
        "events": 31_097,
        "core_us_per_event": 600.0,
        "cached_us_per_event": 400.0,
        "core_events_per_s": 2_500.0,
        "no_models_events_per_s": 30_000.0,
        "timers_per_event": 0.65,
        "state_bytes_mean": 1_800.0,
        "state_bytes_p99": 2_500,
        "state_bytes_max": 2_800,
    }
    rows = {r["figure"]: r for r in figures({"state": state}, checkpoint_interval_ms=5_000, cores=2)}
    assert (
        rows["in-memory core (per-user step, timers, state encode), the shipped models: events/s"]["verdict"] == "MISS"
    )
    assert rows["in-memory core without the model segments and models: events/s"]["verdict"] == "pass"
