"""The field layout of an Avro record schema, as the hand-written codecs of the hot path
(udfs/event_avro.py, udfs/transition_avro.py) check it against the layout they were written for
when they are built: a schema change they do not follow is refused, never misread."""

from __future__ import annotations


class AvroLayoutError(ValueError):
    """The schema's fields are not the ones a hand-written codec reads or writes."""


def type_name(avro_type: object) -> str:
    """`string`, `enum`, `null|string`, `map<double>`, `array<string>`...: what the codecs tell
    apart (a logical type is written as its underlying type)."""
    if isinstance(avro_type, str):
        return avro_type
    if isinstance(avro_type, list):
        return "|".join(type_name(t) for t in avro_type)
    if isinstance(avro_type, dict):
        kind = str(avro_type["type"])
        if kind == "map":
            return f"map<{type_name(avro_type['values'])}>"
        if kind == "array":
            return f"array<{type_name(avro_type['items'])}>"
        return kind
    raise AvroLayoutError(f"unexpected Avro type {avro_type!r}")


def check_layout(fields: list, layout: tuple[tuple[str, str], ...], where: str) -> None:
    """`AvroLayoutError` unless `fields` (a record schema's) are `layout`, name and type, in order."""
    found = tuple((str(f["name"]), type_name(f["type"])) for f in fields)
    if found != layout:
        raise AvroLayoutError(f"{where}: the schema's fields {found} are not the layout {layout} of its codec")
