"""Committed transitions as `segments tail` prints them: read with the project's read_committed
reader (jobs/committed_log), so tail shows what the Redis view applies, and decoded."""

from __future__ import annotations

from collections.abc import Iterator

from jobs.committed_log import follow_committed_records
from jobs.kafka_security import PLAINTEXT, KafkaSecurity
from udfs.codec import SchemaCatalog


def follow_transitions(
    bootstrap_servers: str, topic: str, from_beginning: bool = False, security: KafkaSecurity = PLAINTEXT
) -> Iterator[dict]:
    """Each transition as its transaction commits, without end: from the beginning, or from now."""
    codec = SchemaCatalog().codec("SegmentTransition")
    for record in follow_committed_records(bootstrap_servers, topic, from_beginning, security=security):
        yield codec.decode(record.value)
