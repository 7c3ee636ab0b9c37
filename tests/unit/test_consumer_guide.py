"""Issue 20.7: the consumer's guide (docs/consumers.md) stays consistent with the contract and
the Redis layout: every field of the transition schema, nested ones too, has a row in its fields
table and no row names a field the schema lacks; its Redis keys are the layout's; the example
consumer reads committed records only. (The example itself runs in tests/e2e/test_consumer_example.py.)"""

from __future__ import annotations

import json
import re

from udfs.codec import SCHEMAS_DIR
from udfs.redis_layout import members_key, sequence_key, user_key

GUIDE = SCHEMAS_DIR.parent / "docs" / "consumers.md"


def section(title: str) -> str:
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_first_column(text: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)` \|", row)[1] for row in rows]


def schema_fields(fields: list[dict], prefix: str = "") -> list[str]:
    out = []
    for f in fields:
        out.append(prefix + f["name"])
        if isinstance(f["type"], dict) and f["type"].get("type") == "record":
            out += schema_fields(f["type"]["fields"], f"{prefix}{f['name']}.")
    return out


def test_every_field_of_the_transition_schema_has_a_row_and_only_those():
    schema = json.loads((SCHEMAS_DIR / "segment_transition.avsc").read_text(encoding="utf-8"))
    expected = schema_fields(schema["fields"])
    assert "reason.missing" in expected and "transition_id" in expected  # the walk reached both levels
    documented = table_first_column(section("The fields"))
    assert documented == expected  # each once, in the schema's order


def test_the_redis_keys_of_the_guide_are_the_layouts():
    keys = table_first_column(section("Redis lookups"))
    assert keys == [user_key("seg", "{user_id}"), members_key("seg", "{segment}"), sequence_key("seg", "{user_id}")]


def test_the_example_consumer_reads_committed_records_and_commits_its_offsets_itself():
    source = (SCHEMAS_DIR.parent / "docs" / "examples" / "transitions_consumer.py").read_text(encoding="utf-8")
    assert '"isolation.level": "read_committed"' in source
    assert '"enable.auto.commit": False' in source
