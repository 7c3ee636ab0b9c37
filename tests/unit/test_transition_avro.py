"""The job's transition writer (udfs/transition_avro.py) against fastavro, the codec every other
runner uses: the same bytes for any transition, and a schema whose fields differ is refused."""

import copy
import io
import json

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udfs.avro_layout import AvroLayoutError
from udfs.codec import SCHEMAS_DIR, SchemaCatalog
from udfs.transition_avro import TransitionWriter
from udfs.transitions import Transition

SCHEMA = json.loads((SCHEMAS_DIR / "segment_transition.avsc").read_text())
CODEC = SchemaCatalog().codec("SegmentTransition")
by_name = {f["name"]: f for f in SCHEMA["fields"]}
KINDS = by_name["kind"]["type"]["symbols"]
CAUSES = by_name["cause"]["type"]["symbols"]

text = st.text(max_size=40)
longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
doubles = st.floats(allow_nan=False) | st.integers(min_value=-(2**53), max_value=2**53)

transitions = st.builds(
    Transition,
    user_id=text,
    segment=text,
    kind=st.sampled_from(KINDS),
    event_time=longs,
    cause=st.sampled_from(CAUSES),
    cause_event_id=st.none() | text,
    sequence=longs,
    definitions_version=text,
    model_version=st.none() | text,
    rule=text,
    features=st.dictionaries(text, doubles, max_size=6),
    scores=st.dictionaries(text, doubles, max_size=4),
    labels=st.dictionaries(text, text, max_size=4),
    missing=st.lists(text, max_size=4).map(tuple),
    arms=st.dictionaries(text, st.sampled_from(["control", "treatment"]), max_size=3),
    provisional=st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(transitions, longs)
def test_the_writer_writes_what_fastavro_writes_for_the_record(transition, emitted_at):
    expected = io.BytesIO()
    fastavro.schemaless_writer(expected, fastavro.parse_schema(copy.deepcopy(SCHEMA)), transition.to_record(emitted_at))
    body = TransitionWriter(SCHEMA).body(transition, emitted_at)
    assert body == expected.getvalue()
    # and the job's payload (header + body) reads back as the record
    assert CODEC.decode(CODEC.header + body) == transition.to_record(emitted_at)


def test_a_schema_with_other_fields_is_refused_when_the_writer_is_built():
    extra = copy.deepcopy(SCHEMA)
    extra["fields"].append({"name": "shadow", "type": "boolean", "default": False})
    with pytest.raises(AvroLayoutError, match="not the layout"):
        TransitionWriter(extra)
    reordered = copy.deepcopy(SCHEMA)
    reason = next(f for f in reordered["fields"] if f["name"] == "reason")
    reason["type"]["fields"].reverse()
    with pytest.raises(AvroLayoutError, match="SegmentTransition.reason"):
        TransitionWriter(reordered)


def test_a_symbol_added_to_an_enum_is_written_by_its_index_in_the_schema():
    more = copy.deepcopy(SCHEMA)
    cause = next(f for f in more["fields"] if f["name"] == "cause")
    cause["type"]["symbols"] = [*cause["type"]["symbols"], "NEW_CAUSE"]
    writer = TransitionWriter(more)
    assert writer.causes["NEW_CAUSE"] == len(CAUSES)
