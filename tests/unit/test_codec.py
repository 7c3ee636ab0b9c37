"""The wire contract: Avro single-object encoding, byte-compatible with Apache avro both ways,
precise rejection reasons, and schema evolution through schemas/history/."""

from __future__ import annotations

import functools
import io
import json
import shutil
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import avro.io
import avro.schema
import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import START_MS
from udfs.codec import HEADER_SIZE, MAGIC, SCHEMAS_DIR, DecodeError, SchemaCatalog, schema_fingerprint
from udfs.events import EVENT_TYPES

SCHEMA_FILES = {
    "UserEvent": "user_event.avsc",
    "SegmentTransition": "segment_transition.avsc",
    "DeadLetter": "dead_letter.avsc",
    "UserProfileState": "user_profile_state.avsc",
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def schema_json(record_name: str) -> dict:
    return json.loads((SCHEMAS_DIR / SCHEMA_FILES[record_name]).read_text())


@functools.cache
def apache_schema(record_name: str) -> avro.schema.Schema:
    return avro.schema.parse((SCHEMAS_DIR / SCHEMA_FILES[record_name]).read_text())


def ms_to_datetime(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def datetime_to_ms(value: datetime) -> int:
    return (value - EPOCH) // timedelta(milliseconds=1)


def apache_read(record_name: str, body: bytes) -> dict:
    decoder = avro.io.BinaryDecoder(io.BytesIO(body))
    return avro.io.DatumReader(apache_schema(record_name)).read(decoder)


def apache_write(record_name: str, record: dict) -> bytes:
    buffer = io.BytesIO()
    avro.io.DatumWriter(apache_schema(record_name)).write(record, avro.io.BinaryEncoder(buffer))
    return buffer.getvalue()


# Timestamp-millis fields: Apache avro reads them as datetime and writes datetime; we keep int ms.
TIMESTAMP_FIELDS = {
    "UserEvent": ("timestamp",),
    "SegmentTransition": ("event_time", "emitted_at"),
    "DeadLetter": ("detected_at",),
}


def to_apache(record_name: str, record: dict) -> dict:
    return {k: ms_to_datetime(v) if k in TIMESTAMP_FIELDS[record_name] else v for k, v in record.items()}


def from_apache(record_name: str, record: dict) -> dict:
    return {k: datetime_to_ms(v) if k in TIMESTAMP_FIELDS[record_name] else v for k, v in record.items()}


# --- strategies -----------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=24)  # any unicode but lone surrogates
# Within what datetime can hold, so Apache avro can turn them into datetime and back.
# The fields version 2 of UserEvent added (schemas/history/user_event.v1.avsc is version 1).
CONTEXT_FIELDS = ("referrer", "utm_source", "utm_medium", "utm_campaign", "country", "timezone")
timestamps = st.integers(min_value=-(2**40), max_value=2**47)
finite_doubles = st.floats(allow_nan=False, allow_infinity=False)


def optional(strategy):
    return st.none() | strategy


user_event_records = st.fixed_dictionaries(
    {
        "event_id": texts,
        "user_id": texts,
        "event_type": st.sampled_from(EVENT_TYPES),
        "timestamp": timestamps,
        "session_id": optional(texts),
        "product_id": optional(texts),
        "category": optional(texts),
        "price": optional(finite_doubles),
        "quantity": optional(st.integers(*INT32)),
        "device": optional(texts),
        "properties": st.dictionaries(texts, texts, max_size=5),
        **{name: optional(texts) for name in CONTEXT_FIELDS},
        "known_user_id": optional(texts),
    }
)

segment_transition_records = st.fixed_dictionaries(
    {
        "transition_id": texts,
        "user_id": texts,
        "segment": texts,
        "kind": st.sampled_from(["ENTER", "EXIT"]),
        "event_time": timestamps,
        "emitted_at": timestamps,
        "cause": st.sampled_from(["EVENT", "TIMER"]),
        "cause_event_id": optional(texts),
        "sequence": st.integers(*INT64),
        "definitions_version": texts,
        "model_version": optional(texts),
        "reason": st.fixed_dictionaries(
            {
                "rule": texts,
                "features": st.dictionaries(texts, finite_doubles, max_size=4),
                "scores": st.dictionaries(texts, finite_doubles, max_size=4),
                "labels": st.dictionaries(texts, texts, max_size=3),
                "missing": st.lists(texts, max_size=3),
                "provisional": st.booleans(),
            }
        ),
        "arms": st.dictionaries(texts, st.sampled_from(["control", "treatment"]), max_size=2),
    }
)

dead_letter_records = st.fixed_dictionaries(
    {
        "payload": st.binary(max_size=64),
        "source_topic": texts,
        "source_partition": st.integers(*INT32),
        "source_offset": st.integers(*INT64),
        "reason": texts,
        "message": texts,
        "detected_at": timestamps,
    }
)

RECORDS = {
    "UserEvent": user_event_records,
    "SegmentTransition": segment_transition_records,
    "DeadLetter": dead_letter_records,
}


def a_user_event(**changes) -> dict:
    record = {
        "event_id": "u1-1",
        "user_id": "u1",
        "event_type": "add_to_cart",
        "timestamp": START_MS,
        "session_id": "u1-s1",
        "product_id": "p-shoes-001",
        "category": "shoes",
        "price": 12.5,
        "quantity": 2,
        "device": "mobile",
        "properties": {"query": "schuhe grün"},
        **dict.fromkeys(CONTEXT_FIELDS),
        "known_user_id": None,
    }
    return {**record, **changes}


def a_transition(**changes) -> dict:
    record = {
        "transition_id": "6f1c0d57-0000-5000-8000-000000000000",
        "user_id": "u1",
        "segment": "active_browser",
        "kind": "ENTER",
        "event_time": START_MS,
        "emitted_at": START_MS + 5,
        "cause": "EVENT",
        "cause_event_id": "u1-1",
        "sequence": 1,
        "definitions_version": "builtin-1",
        "model_version": None,
        "reason": {
            "rule": "ms_since_last_event < 600000",
            "features": {"ms_since_last_event": 0.0},
            "scores": {},
            "labels": {},
            "missing": [],
            "provisional": False,
        },
        "arms": {},
    }
    return {**record, **changes}


# --- header and fingerprint -----------------------------------------------------------------


def crc64_avro(data: bytes) -> int:
    """The reference CRC-64-AVRO from the Avro specification, independent of both libraries."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


@pytest.mark.parametrize("record_name", sorted(SCHEMA_FILES))
def test_header_is_magic_then_apache_avros_crc64_of_the_spec_canonical_form(catalog, record_name):
    schema = schema_json(record_name)
    # Apache avro 1.12's own `canonical_form` keeps {"type": "long"} for logical types, which is not
    # what the spec says (primitives collapse to "long"), so take avro's CRC of the spec canonical
    # form as computed by fastavro. See the test documenting the difference below.
    reference = avro.schema.parse(to_parsing_canonical_form(schema)).fingerprint("CRC-64-AVRO")
    codec = catalog.codec(record_name)
    assert len(codec.header) == HEADER_SIZE == 10
    assert codec.header[:2] == b"\xc3\x01" == MAGIC
    assert codec.header[2:] == reference


@pytest.mark.parametrize("record_name", sorted(SCHEMA_FILES))
def test_header_fingerprint_is_the_spec_crc64_in_little_endian_byte_order(catalog, record_name):
    canonical = to_parsing_canonical_form(schema_json(record_name)).encode()
    assert catalog.codec(record_name).header[2:] == struct.pack("<Q", crc64_avro(canonical))


def test_every_encoded_payload_starts_with_the_header_of_its_writer_schema(catalog):
    codec = catalog.codec("UserEvent")
    payload = codec.encode(a_user_event())
    assert payload[:HEADER_SIZE] == codec.header
    assert payload[HEADER_SIZE:] == codec.body(a_user_event())


def test_apache_avros_own_canonical_form_keeps_the_logical_type_long_object_for_user_event():
    # Documents the deviation the fingerprint test works around. If Apache avro starts producing
    # the spec form, this fails: then the header test can use avro's canonical form directly.
    schema = schema_json("UserEvent")
    apache_form = avro.schema.parse(json.dumps(schema)).canonical_form
    spec_form = to_parsing_canonical_form(schema)
    assert apache_form != spec_form
    assert '{"name":"timestamp","type":{"type":"long"}}' in apache_form
    assert '{"name":"timestamp","type":"long"}' in spec_form
    assert apache_form.replace('{"type":"long"}', '"long"') == spec_form


def test_apache_avro_agrees_on_the_canonical_form_of_a_schema_without_logical_types():
    schema = schema_json("UserProfileState")
    assert avro.schema.parse(json.dumps(schema)).canonical_form == to_parsing_canonical_form(schema)


@pytest.mark.parametrize("path", sorted(SCHEMAS_DIR.rglob("*.avsc")), ids=lambda p: p.name)
def test_every_schema_file_parses_with_fastavro_and_apache_avro(path):
    text = path.read_text()
    fastavro.parse_schema(json.loads(text))
    parsed = avro.schema.parse(text)
    assert parsed.type == "record"


# --- interop with Apache avro, both directions ----------------------------------------------


@settings(max_examples=120)
@given(record=user_event_records)
def test_user_event_bytes_are_read_by_apache_avro_and_apache_bytes_are_identical_to_ours(catalog, record):
    codec = catalog.codec("UserEvent")
    ours = codec.encode(record)
    assert from_apache("UserEvent", apache_read("UserEvent", ours[HEADER_SIZE:])) == record
    theirs = codec.header + apache_write("UserEvent", to_apache("UserEvent", record))
    assert theirs == ours
    assert codec.decode(theirs) == record


@pytest.mark.parametrize("record_name", ["SegmentTransition", "DeadLetter"])
@settings(max_examples=60)
@given(data=st.data())
def test_transition_and_dead_letter_bytes_interoperate_with_apache_avro(catalog, record_name, data):
    record = data.draw(RECORDS[record_name])
    codec = catalog.codec(record_name)
    ours = codec.encode(record)
    assert from_apache(record_name, apache_read(record_name, ours[HEADER_SIZE:])) == record
    theirs = codec.header + apache_write(record_name, to_apache(record_name, record))
    assert theirs == ours
    assert codec.decode(theirs) == record


def test_a_fixed_transition_record_round_trips_through_apache_avro(catalog):
    codec = catalog.codec("SegmentTransition")
    record = a_transition()
    ours = codec.encode(record)
    read = apache_read("SegmentTransition", ours[HEADER_SIZE:])
    assert read["event_time"] == ms_to_datetime(START_MS)
    assert from_apache("SegmentTransition", read) == record


# --- rejection reasons ----------------------------------------------------------------------


def reason_of(codec, payload) -> str:
    with pytest.raises(DecodeError) as err:
        codec.decode(payload)
    return err.value.reason


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage", b"\xc3", b"\xc3\x01\x00", b'{"user_id": "u1"}', b"\x00\x01" + b"\x00" * 20],
    ids=["empty", "text", "half_magic", "short_header", "json", "wrong_magic"],
)
def test_garbage_bytes_are_rejected_as_bad_magic(catalog, payload):
    assert reason_of(catalog.codec("UserEvent"), payload) == "bad_magic"


def test_the_right_magic_with_an_unknown_fingerprint_is_rejected_as_unknown_schema(catalog):
    codec = catalog.codec("UserEvent")
    body = codec.body(a_user_event())
    assert reason_of(codec, MAGIC + b"\x00" * 8 + body) == "unknown_schema"
    flipped = bytes([codec.fingerprint[0] ^ 0xFF]) + codec.fingerprint[1:]
    assert reason_of(codec, MAGIC + flipped + body) == "unknown_schema"


def test_a_segment_transition_payload_decoded_as_a_user_event_is_rejected_as_wrong_schema(catalog):
    payload = catalog.codec("SegmentTransition").encode(a_transition())
    assert reason_of(catalog.codec("UserEvent"), payload) == "wrong_schema"


def test_a_user_event_payload_decoded_as_a_transition_is_rejected_as_wrong_schema(catalog):
    payload = catalog.codec("UserEvent").encode(a_user_event())
    assert reason_of(catalog.codec("SegmentTransition"), payload) == "wrong_schema"


def test_every_truncation_of_a_valid_body_is_rejected_as_undecodable(catalog):
    codec = catalog.codec("UserEvent")
    payload = codec.encode(a_user_event())
    for cut in range(HEADER_SIZE, len(payload)):
        assert reason_of(codec, payload[:cut]) == "undecodable", cut


@pytest.mark.parametrize("extra", [b"\x00", b"\x02ab", b"\xff" * 16])
def test_extra_trailing_bytes_after_a_valid_record_are_rejected_as_undecodable(catalog, extra):
    codec = catalog.codec("UserEvent")
    assert reason_of(codec, codec.encode(a_user_event()) + extra) == "undecodable"


def zigzag(n: int) -> bytes:
    """Avro's int and long: zig-zag, then a base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def avro_string(text: str) -> bytes:
    return zigzag(len(text.encode())) + text.encode()


def user_event_body(event_type: int = 2, session_branch: int = 1) -> bytes:
    """A UserEvent body written by hand, with any enum index and session_id union branch; the
    session id follows whichever branch a reader takes for the index (-1 read as string, -2 as
    null), so that a reader that wraps a negative index around reads the whole body."""
    session = avro_string("u1-s1") if session_branch in (1, -1) else b""
    return (
        avro_string("u1-1")
        + avro_string("u1")
        + zigzag(event_type)
        + zigzag(START_MS)
        + zigzag(session_branch)
        + session
        + b"\x00" * 5
        + b"\x00"
        + b"\x00" * len(CONTEXT_FIELDS)
        + b"\x00"  # known_user_id (v3)
    )


def test_the_hand_written_user_event_body_is_what_the_codec_writes(catalog):
    codec = catalog.codec("UserEvent")
    record = a_user_event(product_id=None, category=None, price=None, quantity=None, device=None, properties={})
    assert codec.body(record) == user_event_body()
    assert codec.decode(codec.header + user_event_body(session_branch=0)) == {**record, "session_id": None}


@pytest.mark.parametrize("index", [-1, -2, -11, -12, 11, 2**31, -(2**63)])
def test_an_enum_index_outside_the_symbols_is_undecodable_negative_ones_too(catalog, index):
    # fastavro's compiled reader wraps a negative index around: -1 read the last symbol.
    codec = catalog.codec("UserEvent")
    assert reason_of(codec, codec.header + user_event_body(event_type=index)) == "undecodable"


@pytest.mark.parametrize("branch", [-1, -2, -3, 2, 2**62])
def test_a_union_branch_outside_the_union_is_undecodable_negative_ones_too(catalog, branch):
    codec = catalog.codec("UserEvent")
    assert reason_of(codec, codec.header + user_event_body(session_branch=branch)) == "undecodable"


def test_a_payload_bigger_than_max_bytes_is_rejected_as_oversize_and_one_at_the_limit_is_not(catalog):
    payload = catalog.codec("UserEvent").encode(a_user_event())
    at_limit = catalog.codec("UserEvent", max_bytes=len(payload))
    assert at_limit.decode(payload) == a_user_event()
    assert reason_of(catalog.codec("UserEvent", max_bytes=len(payload) - 1), payload) == "oversize"


def test_oversize_is_checked_before_anything_else_so_huge_garbage_is_oversize(catalog):
    assert reason_of(catalog.codec("UserEvent", max_bytes=100), b"x" * 101) == "oversize"


def test_a_missing_value_is_undecodable(catalog):
    assert reason_of(catalog.codec("UserEvent"), None) == "undecodable"


def test_decode_accepts_bytearray_and_memoryview(catalog):
    codec = catalog.codec("UserEvent")
    payload = codec.encode(a_user_event())
    assert codec.decode(bytearray(payload)) == a_user_event()
    assert codec.decode(memoryview(payload)) == a_user_event()


@pytest.mark.parametrize("record_name", sorted(SCHEMA_FILES))
@settings(max_examples=200)
@given(tail=st.binary(max_size=80))
def test_any_bytes_after_a_valid_header_decode_to_a_dict_or_raise_decode_error(catalog, record_name, tail):
    codec = catalog.codec(record_name)
    try:
        result = codec.decode(codec.header + tail)
    except DecodeError as err:
        assert err.reason in {"undecodable"}
    else:
        assert isinstance(result, dict)


@settings(max_examples=200)
@given(payload=st.binary(max_size=80))
def test_any_bytes_at_all_decode_to_a_dict_or_raise_decode_error(catalog, payload):
    try:
        result = catalog.codec("UserEvent").decode(payload)
    except DecodeError as err:
        assert err.reason in {"bad_magic", "unknown_schema", "wrong_schema", "undecodable"}
    else:
        assert isinstance(result, dict)


# --- schema evolution -----------------------------------------------------------------------

ADDED_FIELDS = [
    {"name": "page_language", "type": ["null", "string"], "default": None},
    {"name": "channel", "type": "string", "default": "web"},
]


@pytest.fixture
def evolved_catalogs(tmp_path: Path) -> tuple[SchemaCatalog, SchemaCatalog]:
    """(old, new): old has today's user_event.avsc as current; new has it with two added fields
    as current and today's file under history/."""
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    shutil.copy(SCHEMAS_DIR / "user_event.avsc", old_dir / "user_event.avsc")
    new_dir = tmp_path / "new"
    (new_dir / "history").mkdir(parents=True)
    shutil.copy(SCHEMAS_DIR / "user_event.avsc", new_dir / "history" / "user_event.avsc")
    evolved = schema_json("UserEvent")
    evolved["fields"] = evolved["fields"] + ADDED_FIELDS
    (new_dir / "user_event.avsc").write_text(json.dumps(evolved))
    return SchemaCatalog(old_dir), SchemaCatalog(new_dir)


def test_a_payload_from_the_previous_schema_decodes_with_the_new_one_filling_defaults(evolved_catalogs):
    old, new = evolved_catalogs
    old_payload = old.codec("UserEvent").encode(a_user_event())
    new_codec = new.codec("UserEvent")
    assert old_payload[:HEADER_SIZE] != new_codec.header
    assert new_codec.decode(old_payload) == {**a_user_event(), "page_language": None, "channel": "web"}


def test_the_evolved_schema_writes_and_reads_its_own_new_fields(evolved_catalogs):
    _, new = evolved_catalogs
    codec = new.codec("UserEvent")
    record = {**a_user_event(), "page_language": "de", "channel": "app"}
    assert codec.decode(codec.encode(record)) == record


def test_a_payload_from_a_newer_schema_is_unknown_to_an_older_reader(evolved_catalogs):
    old, new = evolved_catalogs
    new_payload = new.codec("UserEvent").encode({**a_user_event(), "page_language": None, "channel": "web"})
    assert reason_of(old.codec("UserEvent"), new_payload) == "unknown_schema"


def test_truncated_old_payloads_are_undecodable_under_the_new_schema(evolved_catalogs):
    old, new = evolved_catalogs
    old_payload = old.codec("UserEvent").encode(a_user_event())
    codec = new.codec("UserEvent")
    for cut in range(HEADER_SIZE, len(old_payload)):
        assert reason_of(codec, old_payload[:cut]) == "undecodable", cut
    assert reason_of(codec, old_payload + b"\x00") == "undecodable"


def test_a_negative_index_is_undecodable_in_a_previous_schema_version_too(evolved_catalogs):
    old, new = evolved_catalogs
    header = old.codec("UserEvent").header  # read by the new codec as a history version
    codec = new.codec("UserEvent")
    assert codec.decode(header + user_event_body())["event_type"] == "add_to_cart"
    assert reason_of(codec, header + user_event_body(event_type=-1)) == "undecodable"
    assert reason_of(codec, header + user_event_body(session_branch=-1)) == "undecodable"


# --- the transition contract's own history --------------------------------------------------


def history_schema(file_name: str) -> dict:
    return json.loads((SCHEMAS_DIR / "history" / file_name).read_text())


def without_arms(record: dict) -> dict:
    """A transition as v2 (before `arms` and `reason.provisional`) wrote it; v1 had no
    `reason.labels` nor `reason.missing` either."""
    reason = {k: v for k, v in record["reason"].items() if k != "provisional"}
    return {k: v for k, v in record.items() if k != "arms"} | {"reason": reason}


@pytest.mark.parametrize("version", ["segment_transition.v1.avsc", "segment_transition.v2.avsc"])
def test_transitions_written_with_an_earlier_contract_decode_with_their_defaults(catalog, version):
    old = history_schema(version)
    old_fields = {f["name"] for f in old["fields"]}
    assert "arms" not in old_fields
    record = without_arms(a_transition())
    reason_fields = {f["name"] for f in next(f for f in old["fields"] if f["name"] == "reason")["type"]["fields"]}
    record["reason"] = {k: v for k, v in record["reason"].items() if k in reason_fields}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(old), record)
    payload = MAGIC + schema_fingerprint(old) + body.getvalue()
    decoded = catalog.codec("SegmentTransition").decode(payload)
    assert decoded["arms"] == {}
    assert decoded["reason"]["missing"] == [] and decoded["reason"]["labels"] == {}
    assert without_arms(decoded)["segment"] == record["segment"]


def test_a_transition_with_arms_is_read_by_a_consumer_still_on_the_v2_schema(catalog):
    """Avro schema resolution, writer = the current contract, reader = v2: the new field is
    skipped and everything else reads as before, so a consumer need not upgrade first."""
    record = a_transition(arms={"spring_promo": "control", "winter": "treatment"})
    payload = catalog.codec("SegmentTransition").encode(record)
    read = fastavro.schemaless_reader(
        io.BytesIO(payload[HEADER_SIZE:]),
        fastavro.parse_schema(catalog.current["SegmentTransition"]),
        fastavro.parse_schema(history_schema("segment_transition.v2.avsc")),
    )
    assert from_apache("SegmentTransition", read) == without_arms(record)  # fastavro gives datetimes too


def test_the_transition_contract_adds_arms_in_v3_and_the_provisional_reason_in_v4():
    current = history_schema("segment_transition.v4.avsc")
    v2, v3 = history_schema("segment_transition.v2.avsc"), history_schema("segment_transition.v3.avsc")
    assert v3["fields"][:-1] == v2["fields"]
    added = v3["fields"][-1]
    assert (added["name"], added["type"], added["default"]) == ("arms", {"type": "map", "values": "string"}, {})

    def reason_fields(schema: dict) -> list[dict]:
        return next(f for f in schema["fields"] if f["name"] == "reason")["type"]["fields"]

    def without_reason(schema: dict) -> list[dict]:
        return [f for f in schema["fields"] if f["name"] != "reason"]

    v4 = history_schema("segment_transition.v4.avsc")
    assert without_reason(v4) == without_reason(v3)
    assert reason_fields(v4)[:-1] == reason_fields(v3)
    assert reason_fields(current) == reason_fields(v4)
    provisional = reason_fields(v4)[-1]
    assert (provisional["name"], provisional["type"], provisional["default"]) == ("provisional", "boolean", False)


def test_the_transition_contract_v5_adds_causes_with_a_default():
    """v5 (issue 18): the cause gains ERASURE, CONSENT and MERGE, in that order, and a default
    so that a reader of v5 reads a cause added later as EVENT; nothing else changes."""
    current, v4 = history_schema("segment_transition.v5.avsc"), history_schema("segment_transition.v4.avsc")

    def cause(schema: dict) -> dict:
        return next(f for f in schema["fields"] if f["name"] == "cause")["type"]

    assert [f for f in current["fields"] if f["name"] != "cause"] == [f for f in v4["fields"] if f["name"] != "cause"]
    assert cause(v4)["symbols"] == ["EVENT", "TIMER"]
    assert cause(current)["symbols"] == ["EVENT", "TIMER", "ERASURE", "CONSENT", "MERGE"]
    assert cause(current)["default"] == "EVENT"


def test_a_merge_transition_round_trips_and_a_v4_transition_still_decodes(catalog, tmp_path):
    codec = catalog.codec("SegmentTransition")
    merged = a_transition(cause="MERGE")
    assert codec.decode(codec.encode(merged)) == merged
    v4_dir = tmp_path / "v4"
    v4_dir.mkdir()
    shutil.copy(SCHEMAS_DIR / "history" / "segment_transition.v4.avsc", v4_dir / "segment_transition.avsc")
    previous = a_transition(cause="TIMER")
    payload = SchemaCatalog(v4_dir).codec("SegmentTransition").encode(previous)
    assert payload[:HEADER_SIZE] != codec.header
    assert codec.decode(payload) == previous


def test_a_payload_of_the_shipped_version_1_decodes_with_the_context_absent(catalog, tmp_path):
    """schemas/history/user_event.v1.avsc, as producers before the context fields write it."""
    v1_dir = tmp_path / "v1"
    v1_dir.mkdir()
    shutil.copy(SCHEMAS_DIR / "history" / "user_event.v1.avsc", v1_dir / "user_event.avsc")
    v1 = SchemaCatalog(v1_dir).codec("UserEvent")
    record = {k: v for k, v in a_user_event().items() if k not in (*CONTEXT_FIELDS, "known_user_id")}
    payload = v1.encode(record)
    current = catalog.codec("UserEvent")
    assert payload[:HEADER_SIZE] != current.header
    assert current.decode(payload) == {**record, **dict.fromkeys(CONTEXT_FIELDS), "known_user_id": None}
    # Version 2 is version 1 with the context fields appended, each an optional string defaulting to null.
    v1_fields = json.loads((SCHEMAS_DIR / "history" / "user_event.v1.avsc").read_text())["fields"]
    v2_fields = json.loads((SCHEMAS_DIR / "history" / "user_event.v2.avsc").read_text())["fields"]

    def shape(fields: list[dict]) -> list[tuple]:
        return [(f["name"], f["type"], f.get("default")) for f in fields]

    assert shape(v2_fields[: len(v1_fields)]) == shape(v1_fields)
    assert shape(v2_fields[len(v1_fields) :]) == [(name, ["null", "string"], None) for name in CONTEXT_FIELDS]


def test_user_event_version_3_adds_the_identify_type_and_the_known_user_id():
    """Issue 18: the event type enum gains `identify` at its end (the indices of v2 keep their
    meaning) and a last optional field carries the known id; nothing else changes."""
    v2, v3 = history_schema("user_event.v2.avsc"), schema_json("UserEvent")

    def event_type(schema: dict) -> dict:
        return next(f for f in schema["fields"] if f["name"] == "event_type")["type"]

    assert event_type(v3)["symbols"] == [*event_type(v2)["symbols"], "identify"]
    same = [f for f in v3["fields"][:-1] if f["name"] != "event_type"]
    assert same == [f for f in v2["fields"] if f["name"] != "event_type"]
    added = v3["fields"][-1]
    assert (added["name"], added["type"], added["default"]) == ("known_user_id", ["null", "string"], None)


def test_a_transition_of_the_previous_schema_decodes_as_not_provisional(catalog, tmp_path):
    """schemas/history/segment_transition.v3.avsc, as releases before cold-start segments wrote it."""
    v3_dir = tmp_path / "v3"
    v3_dir.mkdir()
    shutil.copy(SCHEMAS_DIR / "history" / "segment_transition.v3.avsc", v3_dir / "segment_transition.avsc")
    record = a_transition(arms={"spring_promo": "control"})
    previous = {**record, "reason": {k: v for k, v in record["reason"].items() if k != "provisional"}}
    payload = SchemaCatalog(v3_dir).codec("SegmentTransition").encode(previous)
    current = catalog.codec("SegmentTransition")
    assert payload[:HEADER_SIZE] != current.header
    assert current.decode(payload) == {**previous, "reason": {**previous["reason"], "provisional": False}}


def test_v5_adds_the_privacy_and_merge_causes_with_a_default_for_readers_of_later_symbols(catalog):
    """v5 is v4 with the cause enum extended (ERASURE, CONSENT, MERGE) and given the default EVENT:
    a v5 reader resolves a symbol added after it to EVENT instead of failing. A v4 reader has no
    such default: consumers upgrade to v5 before the job emits the new causes (docs/contract.md)."""
    current, v4 = history_schema("segment_transition.v5.avsc"), history_schema("segment_transition.v4.avsc")

    def cause(schema: dict) -> dict:
        return next(f for f in schema["fields"] if f["name"] == "cause")["type"]

    def without_cause(schema: dict) -> list[dict]:
        return [f for f in schema["fields"] if f["name"] != "cause"]

    assert without_cause(current) == without_cause(v4)
    assert cause(current)["symbols"] == ["EVENT", "TIMER", "ERASURE", "CONSENT", "MERGE"]
    assert cause(current)["default"] == "EVENT"
    erased = {**a_transition(), "cause": "ERASURE"}
    codec = catalog.codec("SegmentTransition")
    assert codec.decode(codec.encode(erased))["cause"] == "ERASURE"
    later = json.loads(json.dumps(current))
    cause(later)["symbols"].append("SOMETHING_NEW")
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(later), {**erased, "cause": "SOMETHING_NEW"})
    body.seek(0)
    read = fastavro.schemaless_reader(body, fastavro.parse_schema(later), fastavro.parse_schema(current))
    assert read["cause"] == "EVENT"


def test_the_transition_contract_v6_adds_the_deployment_cause_at_the_end():
    """v6 (issue 17, docs/deployments.md): the cause gains DEPLOYMENT after v5's symbols, the
    default stays EVENT (a v5 reader reads DEPLOYMENT as EVENT); nothing else changes."""
    current, v5 = schema_json("SegmentTransition"), history_schema("segment_transition.v5.avsc")

    def cause(schema: dict) -> dict:
        return next(f for f in schema["fields"] if f["name"] == "cause")["type"]

    assert [f for f in current["fields"] if f["name"] != "cause"] == [f for f in v5["fields"] if f["name"] != "cause"]
    assert cause(current)["symbols"] == [*cause(v5)["symbols"], "DEPLOYMENT"]
    assert cause(current)["default"] == "EVENT"
    switched = {**a_transition(), "cause": "DEPLOYMENT", "cause_event_id": "deployment-1"}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(current), switched)
    body.seek(0)
    read = fastavro.schemaless_reader(body, fastavro.parse_schema(current), fastavro.parse_schema(v5))
    assert read["cause"] == "EVENT"
