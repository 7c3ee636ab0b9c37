"""The job's pipeline on PyFlink's MiniCluster, at parallelism 1 and 2, against the core."""

from __future__ import annotations

import pytest
from pyflink.common import Row, Types

from jobs.segment_users import RAW_RECORD, build_pipeline, create_environment
from jobs.settings import load_settings
from tests.conftest import START_MS
from udfs.segments import BUILTIN_DEFINITIONS_VERSION, builtin_segments
from udfs.shoppers import generate_events
from udfs.transitions import SegmentEngine, replay_events

pytestmark = pytest.mark.flink

COLLECTED = Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING(), Types.STRING(), Types.LONG(), Types.LONG(), Types.PRIMITIVE_ARRAY(Types.BYTE())])


def _bytes(collected) -> bytes:
    # execute_and_collect hands byte arrays back as Java's signed bytes
    return collected if isinstance(collected, bytes) else bytes(b & 0xFF for b in collected)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_job_emits_exactly_the_transitions_the_core_computes(parallelism, catalog):
    events = list(generate_events(80, seed=11, start_ms=START_MS, duration_ms=12 * 3600_000))
    event_codec = catalog.codec("UserEvent")
    rows = [Row(event_codec.encode(e.to_record()), "events", 0, i) for i, e in enumerate(events)]
    rows.insert(len(rows) // 2, Row(b"\x00not avro", "events", 0, 10**6))

    # The reader side runs at 1 (one partition's order, as the core replays it); the keyed
    # function at `parallelism`, which is where keying and state serialization can go wrong.
    settings = load_settings(environ={}, redis_url="", parallelism=1, segment_parallelism=parallelism)
    env = create_environment(settings)
    outputs = build_pipeline(env.from_collection(rows, type_info=RAW_RECORD), settings)
    tagged = outputs.transitions.map(
        lambda r: ("T", r[0], r[1], r[2], r[3], r[4], r[5]), output_type=COLLECTED
    ).union(outputs.dead_letters.map(lambda r: ("D", "", "", "", 0, 0, r[1]), output_type=COLLECTED))
    with tagged.execute_and_collect() as results:
        collected = list(results)

    # A bounded input ends with the final watermark, so every pending timer fires.
    expected, _ = replay_events(
        SegmentEngine(builtin_segments(), BUILTIN_DEFINITIONS_VERSION), events, until_ms=2**62
    )
    got = sorted((c[1], c[2], c[3], c[4], c[5]) for c in collected if c[0] == "T")
    want = sorted((t.user_id, t.segment, t.kind, t.sequence, t.event_time) for t in expected)
    assert len(want) > 100
    assert got == want
    # Every payload decodes to the record the core produced, apart from the wall-clock emit time.
    transitions = catalog.codec("SegmentTransition")
    by_id = {t.transition_id: t for t in expected}
    for c in collected:
        if c[0] == "T":
            record = transitions.decode(_bytes(c[6]))
            assert record == by_id[record["transition_id"]].to_record(record["emitted_at"])
    dead = [catalog.codec("DeadLetter").decode(_bytes(c[6])) for c in collected if c[0] == "D"]
    assert [(d["reason"], d["source_offset"]) for d in dead] == [("bad_magic", 10**6)]
