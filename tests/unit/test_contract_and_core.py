"""The contract (single-object Avro, interoperable with Apache avro) and the engine-free core."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime

import avro.io
import avro.schema
import pytest
from fastavro.schema import to_parsing_canonical_form

from tests.conftest import START_MS
from tests.unit.basic_definitions import basic_definitions
from udfs.codec import MAGIC, SCHEMAS_DIR, DecodeError
from udfs.events import UserEvent, event_from_record
from udfs.profile import UserProfile
from udfs.transitions import SegmentEngine

MINUTE = 60_000
CORE_MODULES = ["udfs.codec", "udfs.events", "udfs.profile", "udfs.conditions", "udfs.definitions", "udfs.transitions",
                "udfs.state", "udfs.shoppers", "udfs.redis_layout"]


def test_core_imports_no_engine_and_no_client_library():
    code = ("import sys, importlib\n"
            f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('pyflink', 'redis', 'confluent_kafka') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def event(n: int, ts: int, kind: str = "page_view", user: str = "u1", **fields) -> UserEvent:
    return UserEvent(f"{user}-{n}", user, kind, ts, **fields)


@pytest.mark.parametrize("name", ["user_event", "segment_transition", "dead_letter", "user_profile_state"])
def test_header_carries_the_spec_fingerprint_apache_avro_computes(catalog, name):
    schema = json.loads((SCHEMAS_DIR / f"{name}.avsc").read_text())
    codec = catalog.codec(schema["name"])
    reference = avro.schema.parse(to_parsing_canonical_form(schema)).fingerprint("CRC-64-AVRO")
    assert codec.header == MAGIC + reference


def test_our_bytes_read_by_apache_avro_and_apache_bytes_read_by_us_are_identical(catalog):
    codec = catalog.codec("UserEvent")
    schema = avro.schema.parse((SCHEMAS_DIR / "user_event.avsc").read_text())
    original = event(1, START_MS, "add_to_cart", product_id="p-1", price=12.5, quantity=2,
                     session_id="s", category="shoes", device="mobile", properties={"q": "ünï"}).to_record()
    ours = codec.encode(original)
    read = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(ours[10:])))
    assert round(read.pop("timestamp").timestamp() * 1000) == original["timestamp"]
    assert read == {k: v for k, v in original.items() if k != "timestamp"}
    buffer = io.BytesIO()
    as_datetime = datetime.fromtimestamp(original["timestamp"] / 1000, tz=UTC)
    avro.io.DatumWriter(schema).write({**original, "timestamp": as_datetime}, avro.io.BinaryEncoder(buffer))
    theirs = codec.header + buffer.getvalue()
    assert theirs == ours
    assert codec.decode(theirs) == original


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"garbage", "bad_magic"),
        (MAGIC + b"\x00" * 8 + b"\x02", "unknown_schema"),
    ],
)
def test_undecodable_payloads_are_rejected_with_their_reason(catalog, payload, reason):
    with pytest.raises(DecodeError) as err:
        catalog.codec("UserEvent").decode(payload)
    assert err.value.reason == reason


def test_truncated_trailing_oversize_and_wrong_type_payloads_are_rejected(catalog):
    codec = catalog.codec("UserEvent", max_bytes=200)
    good = codec.encode(event(1, START_MS).to_record())
    for payload, reason in [
        (good[:-3], "undecodable"),
        (good + b"\x00", "undecodable"),
        (catalog.codec("UserEvent").encode(event(1, START_MS, properties={"x": "y" * 300}).to_record()), "oversize"),
        (catalog.codec("DeadLetter").encode({"payload": b"", "source_topic": "t", "source_partition": 0,
                                             "source_offset": 0, "reason": "r", "message": "m",
                                             "detected_at": START_MS}), "wrong_schema"),
    ]:
        with pytest.raises(DecodeError) as err:
            codec.decode(payload)
        assert err.value.reason == reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"user_id": " "}, "missing_user_id"), ({"timestamp": 5}, "absurd_timestamp"),
     ({"price": float("nan")}, "invalid_field"), ({"timestamp": START_MS + 3 * 86_400_000}, "absurd_timestamp")],
)
def test_invalid_events_are_rejected_with_their_reason(change, reason):
    record = {**event(1, START_MS).to_record(), **change}
    with pytest.raises(DecodeError) as err:
        event_from_record(record, now_ms=START_MS, max_future_ms=86_400_000)
    assert err.value.reason == reason


def engine() -> SegmentEngine:
    return SegmentEngine(basic_definitions())


def test_active_browser_exits_by_timer_exactly_ten_minutes_after_the_last_event():
    e, p = engine(), UserProfile()
    [enter] = e.on_event("u1", p, event(1, START_MS))
    first = START_MS * 1000 + 1  # a lifetime's sequences start above 1000 x its first event time
    assert (enter.kind, enter.cause, enter.cause_event_id, enter.sequence) == ("ENTER", "EVENT", "u1-1", first)
    assert e.next_change_ms(p) == START_MS + 10 * MINUTE
    assert e.advance_to("u1", p, START_MS + 10 * MINUTE - 1) == []
    [exit_] = e.advance_to("u1", p, START_MS + 10 * MINUTE)
    assert (exit_.kind, exit_.cause, exit_.cause_event_id, exit_.event_time, exit_.sequence) == (
        "EXIT", "TIMER", None, START_MS + 10 * MINUTE, START_MS * 1000 + 2)


def test_cart_abandoner_enters_from_time_alone_and_exits_on_purchase():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, event(1, START_MS, "add_to_cart", product_id="p", price=10.0, quantity=1))
    due = START_MS + 30 * MINUTE
    fired = e.advance_to("u1", p, due)
    assert [(t.segment, t.kind, t.event_time) for t in fired] == [
        ("active_browser", "EXIT", START_MS + 10 * MINUTE), ("cart_abandoner", "ENTER", due)]
    later = e.on_event("u1", p, event(2, due + MINUTE, "purchase", price=10.0))
    assert {(t.segment, t.kind) for t in later} == {
        ("active_browser", "ENTER"), ("cart_holder", "EXIT"), ("cart_abandoner", "EXIT")}


def test_an_event_after_a_lapse_first_emits_the_exit_at_the_lapse_instant():
    e, p = engine(), UserProfile()
    e.on_event("u1", p, event(1, START_MS))
    out = e.on_event("u1", p, event(2, START_MS + 25 * MINUTE))
    assert [(t.kind, t.event_time, t.sequence) for t in out] == [
        ("EXIT", START_MS + 10 * MINUTE, START_MS * 1000 + 2), ("ENTER", START_MS + 25 * MINUTE, START_MS * 1000 + 3)]
