"""The Avro binary body of a UserEvent of the current version, read into the record dict fastavro's
reader gives (the keyed function reads one per event): ~13 µs per event through fastavro's
generic reader, a few µs compiled here. `udfs.codec.AvroCodec` uses it for the current version's
payloads and fastavro for every other version (schema resolution). Refuses what fastavro refuses:
a truncated body, an out-of-range union branch or enum symbol, a negative length, invalid UTF-8,
trailing bytes; and one thing fastavro reads as a wrapped-around number, a varint over 64 bits
(tests/unit/test_event_avro.py compares the two over mutated payloads).
"""

from __future__ import annotations

import struct

from udfs.avro_layout import check_layout

_DOUBLE = struct.Struct("<d")

# The fields of user_event.avsc in order, with their types as read here.
LAYOUT: tuple[tuple[str, str], ...] = (
    ("event_id", "string"),
    ("user_id", "string"),
    ("event_type", "enum"),
    ("timestamp", "long"),
    ("session_id", "null|string"),
    ("product_id", "null|string"),
    ("category", "null|string"),
    ("price", "null|double"),
    ("quantity", "null|int"),
    ("device", "null|string"),
    ("properties", "map<string>"),
    ("referrer", "null|string"),
    ("utm_source", "null|string"),
    ("utm_medium", "null|string"),
    ("utm_campaign", "null|string"),
    ("country", "null|string"),
    ("timezone", "null|string"),
    ("known_user_id", "null|string"),
)
_STRING, _ENUM, _LONG, _OPT_STRING, _OPT_DOUBLE, _OPT_INT, _STRING_MAP = range(7)
_CODES = {
    "string": _STRING,
    "enum": _ENUM,
    "long": _LONG,
    "null|string": _OPT_STRING,
    "null|double": _OPT_DOUBLE,
    "null|int": _OPT_INT,
    "map<string>": _STRING_MAP,
}


class BodyError(ValueError):
    """The body is not a record of the schema."""


class _Cursor:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data)

    def long(self) -> int:
        data, pos, end = self.data, self.pos, self.end
        n = 0
        shift = 0
        while True:
            if pos >= end:
                raise BodyError("truncated varint")
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 63:
                raise BodyError("a varint over 64 bits")
        if n >> 64:
            raise BodyError("a varint over 64 bits")
        self.pos = pos
        return (n >> 1) ^ -(n & 1)

    def string(self) -> str:
        length = self.long()
        if length < 0:
            raise BodyError("a negative length")
        start = self.pos
        stop = start + length
        if stop > self.end:
            raise BodyError("truncated string")
        self.pos = stop
        return self.data[start:stop].decode("utf-8")

    def double(self) -> float:
        start = self.pos
        if start + 8 > self.end:
            raise BodyError("truncated double")
        self.pos = start + 8
        value: float = _DOUBLE.unpack_from(self.data, start)[0]
        return value

    def branch(self) -> bool:
        """A [null, X] union's branch: False for null."""
        index = self.long()
        if index == 0:
            return False
        if index == 1:
            return True
        raise BodyError("a union branch out of range")

    def string_map(self) -> dict[str, str]:
        values: dict[str, str] = {}
        while True:
            count = self.long()
            if count == 0:
                return values
            if count < 0:  # a block that gives its size in bytes too
                count = -count
                self.long()
            for _ in range(count):
                key = self.string()
                values[key] = self.string()


class UserEventReader:
    """Reads bodies written with the UserEvent schema it was built from (a dict as read from the
    .avsc); `AvroLayoutError` when that schema's fields are not LAYOUT."""

    def __init__(self, schema: dict) -> None:
        fields = schema["fields"]
        check_layout(fields, LAYOUT, "UserEvent")
        self.names: list[str] = [name for name, _ in LAYOUT]
        self.codes: list[int] = [_CODES[kind] for _, kind in LAYOUT]
        self.symbols: list[str] = [str(s) for s in fields[2]["type"]["symbols"]]

    def read(self, payload: bytes, start: int) -> dict:
        """The record of the body at payload[start:], which it must fill exactly."""
        cursor = _Cursor(payload, start)
        record: dict = {}
        for name, code in zip(self.names, self.codes, strict=True):
            if code == _STRING:
                record[name] = cursor.string()
            elif code == _OPT_STRING:
                record[name] = cursor.string() if cursor.branch() else None
            elif code == _LONG:
                record[name] = cursor.long()
            elif code == _ENUM:
                index = cursor.long()
                if not 0 <= index < len(self.symbols):
                    raise BodyError("an enum symbol out of range")
                record[name] = self.symbols[index]
            elif code == _OPT_DOUBLE:
                record[name] = cursor.double() if cursor.branch() else None
            elif code == _OPT_INT:
                record[name] = cursor.long() if cursor.branch() else None
            else:
                record[name] = cursor.string_map()
        if cursor.pos != cursor.end:
            raise BodyError(f"{cursor.end - cursor.pos} trailing bytes after the record")
        return record
