"""Avro single-object encoding (Avro spec 1.x): 0xC3 0x01, the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema's Parsing Canonical Form, then the binary body.

Readers find the writer schema by fingerprint among the schemas shipped in `schemas/` (current and
`schemas/history/`), so no registry server is needed; fastavro does the hot-path work.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from udfs import PACKAGE_DIR
from udfs.avro_layout import AvroLayoutError
from udfs.event_avro import UserEventReader

MAGIC = b"\xc3\x01"
HEADER_SIZE = 10
SCHEMAS_DIR = PACKAGE_DIR.parent / "schemas"


class DecodeError(ValueError):
    """A payload that cannot be turned into a record; `reason` is a dead-letter reason code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def schema_fingerprint(schema: dict) -> bytes:
    """CRC-64-AVRO of the Parsing Canonical Form, in the byte order the header carries."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def _without_logical_types(schema: Any) -> Any:
    # Reading timestamp-millis as a plain long keeps event time as int milliseconds (no datetime
    # objects on the hot path); the canonical form, and so the fingerprint, is the same.
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    return schema


class _NoWrap(list):
    """A union's branches or an enum's symbols, as the schema a payload is read with: an index
    read from the payload must lie within them. fastavro's compiled reader looks it up as
    `branches[index]`, and Cython wraps a negative index around by adding len() first, so -1
    read the last branch or symbol. len() raising here makes that lookup fail instead (decode
    reports it as undecodable). A valid index never asks for len() (the lookup, no longer
    Cython's exact-list shortcut, costs about 0.2 us an event); nothing in fastavro's reading
    takes len() or bool() of a writer schema's parts, and a reader schema (which it does test)
    is never made of these."""

    __slots__ = ()

    def __len__(self) -> int:
        raise IndexError("a negative index into a union or an enum")


def _strict(parsed: Any, seen: set[int] | None = None) -> Any:
    """`parsed` (a parse_schema result) with its unions and enum symbols made _NoWrap, in place
    and in the named types it carries (a type referred to by name is read from those)."""
    seen = set() if seen is None else seen
    if isinstance(parsed, list):
        return parsed if isinstance(parsed, _NoWrap) else _NoWrap(_strict(s, seen) for s in parsed)
    if not isinstance(parsed, dict) or id(parsed) in seen:
        return parsed
    seen.add(id(parsed))
    kind = parsed["type"]
    if kind == "enum":
        parsed["symbols"] = _NoWrap(parsed["symbols"])
    elif kind in ("record", "error"):
        for f in parsed["fields"]:
            f["type"] = _strict(f["type"], seen)
    elif kind == "array":
        parsed["items"] = _strict(parsed["items"], seen)
    elif kind == "map":
        parsed["values"] = _strict(parsed["values"], seen)
    for named in parsed.get("__named_schemas", {}).values():
        _strict(named, seen)
    return parsed


def _parsed(schema: dict) -> Any:
    # With fastavro's hint that it is parsed: without it schemaless_reader parses the schema
    # again at every call (that was 60% of a UserEvent's decode) and rebuilds the _NoWrap
    # unions as plain lists.
    return parse_schema(_without_logical_types(copy.deepcopy(schema)))


def load_schema_file(path: Path) -> dict:
    """A schema file (.avsc) read as JSON, not yet parsed."""
    return json.loads(path.read_text())


@dataclass(frozen=True)
class _KnownSchema:
    full_name: str
    parsed: Any


class SchemaCatalog:
    """All schema versions we can read, by fingerprint; the current version of each record type."""

    def __init__(self, schemas_dir: Path = SCHEMAS_DIR):
        self.current: dict[str, dict] = {}
        self.by_fingerprint: dict[bytes, _KnownSchema] = {}
        for path in sorted(schemas_dir.glob("*.avsc")):
            self._add(load_schema_file(path), current=True)
        for path in sorted((schemas_dir / "history").glob("*.avsc")):
            self._add(load_schema_file(path), current=False)

    def _add(self, schema: dict, current: bool) -> None:
        full_name = f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")
        self.by_fingerprint[schema_fingerprint(schema)] = _KnownSchema(full_name, _strict(_parsed(schema)))
        if current:
            self.current[schema["name"]] = schema

    def codec(self, record_name: str, max_bytes: int | None = None) -> AvroCodec:
        """The codec for one record of the catalog, refusing payloads over `max_bytes` when given."""
        return AvroCodec(self, record_name, max_bytes)


class AvroCodec:
    """Encodes records of one type with the current schema; decodes any known version of it."""

    def __init__(self, catalog: SchemaCatalog, record_name: str, max_bytes: int | None = None):
        schema = catalog.current[record_name]
        self.full_name = f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")
        self.fingerprint = schema_fingerprint(schema)
        self.header = MAGIC + self.fingerprint
        self.max_bytes = max_bytes
        self._writer = parse_schema(schema)
        self._reader = _strict(_parsed(schema))  # what a payload of the current version is read with
        self._resolver = _parsed(schema)  # what an older version's payload is resolved into
        self._catalog = catalog
        self._fast_reader = _fast_reader(self.full_name, schema)

    def encode(self, record: dict) -> bytes:
        """The record as single-object encoding: the header (marker and fingerprint), then the Avro body."""
        out = io.BytesIO()
        out.write(self.header)
        fastavro.schemaless_writer(out, self._writer, record)
        return out.getvalue()

    def body(self, record: dict) -> bytes:
        """The binary body alone (no header), as Apache avro's DatumWriter writes it."""
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self._writer, record)
        return out.getvalue()

    def decode(self, payload: bytes) -> dict:
        """The record a single-object payload holds; a `DecodeError` with its reason code when it holds none."""
        if payload is None:
            raise DecodeError("undecodable", "record has no value")
        if self.max_bytes is not None and len(payload) > self.max_bytes:
            raise DecodeError("oversize", f"{len(payload)} bytes exceeds the limit of {self.max_bytes}")
        if len(payload) < HEADER_SIZE or payload[:2] != MAGIC:
            raise DecodeError("bad_magic", "not Avro single-object encoding (no C3 01 header)")
        fp = bytes(payload[2:HEADER_SIZE])
        known = self._catalog.by_fingerprint.get(fp)
        if known is None:
            raise DecodeError("unknown_schema", f"writer schema fingerprint {fp.hex()} is not known")
        if known.full_name != self.full_name:
            raise DecodeError("wrong_schema", f"payload is a {known.full_name}, expected {self.full_name}")
        if fp == self.fingerprint and self._fast_reader is not None:
            try:
                return self._fast_reader.read(payload if type(payload) is bytes else bytes(payload), HEADER_SIZE)
            except (ValueError, IndexError) as exc:  # BodyError, invalid UTF-8
                raise DecodeError("undecodable", f"body does not match its schema ({type(exc).__name__})") from None
        body = io.BytesIO(payload)
        body.seek(HEADER_SIZE)
        try:
            if fp == self.fingerprint:
                record = fastavro.schemaless_reader(body, self._reader, None)
            else:
                record = fastavro.schemaless_reader(body, known.parsed, self._resolver)
        except Exception as exc:  # fastavro raises many types on corrupt bodies; all mean the same
            raise DecodeError("undecodable", f"body does not match its schema ({type(exc).__name__})") from None
        if body.tell() != len(payload):
            raise DecodeError("undecodable", f"{len(payload) - body.tell()} trailing bytes after the record")
        return record  # type: ignore[return-value]  # a record schema's value is a dict; fastavro types any Avro value


def _fast_reader(full_name: str, schema: dict) -> UserEventReader | None:
    """The compiled reader of the current UserEvent version (udfs/event_avro.py), None for any
    other record, or for a UserEvent schema whose fields it does not read (then fastavro reads it;
    tests/unit/test_event_avro.py fails on the shipped schema if that ever happens)."""
    if full_name != "segments.v1.UserEvent":
        return None
    try:
        return UserEventReader(schema)
    except AvroLayoutError:
        return None
