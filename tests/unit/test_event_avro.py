"""The compiled UserEvent reader (udfs/event_avro.py) against fastavro, which reads every other
version: the same record for every valid body, and no body accepted that fastavro refuses
(mutated payloads); the one body fastavro reads and this refuses is a varint over 64 bits."""

import copy
import io
import json

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from udfs.avro_layout import AvroLayoutError
from udfs.codec import HEADER_SIZE, SCHEMAS_DIR, DecodeError, SchemaCatalog
from udfs.event_avro import BodyError, UserEventReader

SCHEMA = json.loads((SCHEMAS_DIR / "user_event.avsc").read_text())
PARSED = fastavro.parse_schema(copy.deepcopy(SCHEMA))
SYMBOLS = next(f for f in SCHEMA["fields"] if f["name"] == "event_type")["type"]["symbols"]
READER = UserEventReader(SCHEMA)
CODEC = SchemaCatalog().codec("UserEvent")

text = st.text(max_size=30)
optional = st.none() | text
records = st.fixed_dictionaries(
    {
        "event_id": text,
        "user_id": text,
        "event_type": st.sampled_from(SYMBOLS),
        "timestamp": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "session_id": optional,
        "product_id": optional,
        "category": optional,
        "price": st.none() | st.floats(allow_nan=False),
        "quantity": st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
        "device": optional,
        "properties": st.dictionaries(text, text, max_size=4),
        "referrer": optional,
        "utm_source": optional,
        "utm_medium": optional,
        "utm_campaign": optional,
        "country": optional,
        "timezone": optional,
        "known_user_id": optional,
    }
)


def fastavro_read(body: bytes):
    """fastavro's record, read as AvroCodec read the current version before this reader (its strict
    schema, no logical types), or None where it refuses the body (trailing bytes too)."""
    stream = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(stream, CODEC._reader, None)
    except Exception:
        return None
    return record if stream.tell() == len(body) else None


def ours(body: bytes):
    try:
        return READER.read(body, 0)
    except (BodyError, ValueError):
        return None


def body_of(record: dict) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, PARSED, record)
    return out.getvalue()


@settings(max_examples=300, deadline=None)
@given(records)
def test_every_valid_body_reads_as_fastavro_reads_it(record):
    body = body_of(record)
    assert ours(body) == fastavro_read(body) == record


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.data())
def test_a_mutated_body_is_refused_where_fastavro_refuses_it_and_read_the_same_where_it_reads_it(record, data):
    body = bytearray(body_of(record))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(min_value=0, max_value=max(0, len(body) - 1)))
        if action == "flip" and body:
            body[at] ^= data.draw(st.integers(min_value=1, max_value=255))
        elif action == "cut":
            del body[at:]
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    theirs, mine = fastavro_read(bytes(body)), ours(bytes(body))
    if mine is not None:
        assert mine == theirs
    elif theirs is not None:
        # The one refusal fastavro does not share: a varint of more than 64 bits, which it wraps.
        with pytest.raises(BodyError, match="over 64 bits"):
            READER.read(bytes(body), 0)


def test_the_codec_reads_the_shipped_version_with_this_reader_and_refuses_as_it_did():
    assert CODEC._fast_reader is not None  # a schema change the reader does not follow fails here
    payload = CODEC.header + body_of(
        {
            **{f["name"]: None for f in SCHEMA["fields"]},
            "event_id": "e",
            "user_id": "u",
            "event_type": "purchase",
            "timestamp": 5,
            "properties": {"k": "v"},
        }
    )
    assert CODEC.decode(payload)["properties"] == {"k": "v"}
    with pytest.raises(DecodeError, match="undecodable"):
        CODEC.decode(payload + b"\x00")
    with pytest.raises(DecodeError, match="undecodable"):
        CODEC.decode(payload[: HEADER_SIZE + 3])


def test_a_schema_with_other_fields_is_not_read_by_it():
    other = copy.deepcopy(SCHEMA)
    other["fields"].append({"name": "extra", "type": ["null", "string"], "default": None})
    with pytest.raises(AvroLayoutError):
        UserEventReader(other)
