"""The Avro binary body of a transition, written straight from the `Transition` (the job writes one
per transition, ~0.9 per event): fastavro's generic writer took ~14 µs for the dict of
`Transition.to_record`, this ~2 µs compiled. Byte for byte what fastavro writes for the schema
it was built with (tests/unit/test_transition_avro.py); a schema whose fields differ from the
layout written here is refused when the writer is built, so a schema change cannot go unnoticed.
"""

from __future__ import annotations

import struct

from udfs.avro_layout import check_layout
from udfs.transitions import Transition

_DOUBLE = struct.Struct("<d")

# The fields of segment_transition.avsc in order, each with its Avro type as this writer writes it
# (enums and the reason record are checked by name below).
LAYOUT: tuple[tuple[str, str], ...] = (
    ("transition_id", "string"),
    ("user_id", "string"),
    ("segment", "string"),
    ("kind", "enum"),
    ("event_time", "long"),
    ("emitted_at", "long"),
    ("cause", "enum"),
    ("cause_event_id", "null|string"),
    ("sequence", "long"),
    ("definitions_version", "string"),
    ("model_version", "null|string"),
    ("reason", "record"),
    ("arms", "map<string>"),
)
REASON_LAYOUT: tuple[tuple[str, str], ...] = (
    ("rule", "string"),
    ("features", "map<double>"),
    ("scores", "map<double>"),
    ("labels", "map<string>"),
    ("missing", "array<string>"),
    ("provisional", "boolean"),
)


def _long(out: bytearray, value: int) -> None:
    n = (value << 1) ^ (value >> 63)  # zigzag
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _string(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    _long(out, len(raw))
    out += raw


def _optional_string(out: bytearray, value: str | None) -> None:
    if value is None:
        out.append(0)
    else:
        out.append(2)  # the union's branch 1, zigzag
        _string(out, value)


def _string_map(out: bytearray, values: dict[str, str]) -> None:
    if values:
        _long(out, len(values))
        for key, value in values.items():
            _string(out, key)
            _string(out, value)
    out.append(0)


def _double_map(out: bytearray, values: dict[str, float]) -> None:
    if values:
        _long(out, len(values))
        for key, value in values.items():
            _string(out, key)
            out += _DOUBLE.pack(value)
    out.append(0)


class TransitionWriter:
    """Writes transitions with the SegmentTransition schema it was built from (a dict as read
    from the .avsc)."""

    def __init__(self, schema: dict) -> None:
        fields = schema["fields"]
        check_layout(fields, LAYOUT, "SegmentTransition")
        by_name = {str(f["name"]): f for f in fields}
        check_layout(by_name["reason"]["type"]["fields"], REASON_LAYOUT, "SegmentTransition.reason")
        self.kinds: dict[str, int] = {s: i for i, s in enumerate(by_name["kind"]["type"]["symbols"])}
        self.causes: dict[str, int] = {s: i for i, s in enumerate(by_name["cause"]["type"]["symbols"])}

    def body(self, t: Transition, emitted_at: int) -> bytes:
        """The binary body (no single-object header) of `t.to_record(emitted_at)`."""
        out = bytearray()
        _string(out, t.transition_id)
        _string(out, t.user_id)
        _string(out, t.segment)
        _long(out, self.kinds[t.kind])
        _long(out, t.event_time)
        _long(out, emitted_at)
        _long(out, self.causes[t.cause])
        _optional_string(out, t.cause_event_id)
        _long(out, t.sequence)
        _string(out, t.definitions_version)
        _optional_string(out, t.model_version)
        _string(out, t.rule)
        _double_map(out, t.features)
        _double_map(out, t.scores)
        _string_map(out, t.labels)
        if t.missing:
            _long(out, len(t.missing))
            for name in t.missing:
                _string(out, name)
        out.append(0)
        out.append(1 if t.provisional else 0)
        _string_map(out, t.arms)
        return bytes(out)
