"""The records of the job's identity feedback topic (docs/architecture.md, "Identity merge across
keys"): folds and forwarded events, written by the keyed function at one key and read back by it
at another, through an exactly-once Kafka sink and a read_committed source.

Both are UserEvent records, so the Java keying (UserEventKeys) keys them by their `user_id`, the
receiving id, unchanged. A fold is an `identify` record carrying the folded profile in the state
codec's bytes; a forwarded event is the event with the receiving id. Each counts the aliases it
has crossed, so aliases that form a cycle dead-letter it instead of passing it round for ever.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace

from udfs.events import UserEvent
from udfs.identity import IDENTIFY

# Properties of the feedback records (internal: never on the events topic).
FOLDED_PROFILE = "identity_folded_profile"  # base64 of the state codec's bytes
FOLDED_FROM = "identity_folded_from"  # the id whose profile it is
HOPS = "identity_hops"


@dataclass(frozen=True)
class Fold:
    """A fold as read back: the identify's id and time, the id it comes from, the profile."""

    identify_event_id: str
    timestamp: int
    source_id: str
    hops: int
    profile_bytes: bytes


def fold_record(identify_event_id: str, timestamp: int, source_id: str, target_id: str, hops: int, profile: bytes):
    """The UserEvent record of a fold going to `target_id`."""
    return UserEvent(
        identify_event_id,
        target_id,
        IDENTIFY,
        timestamp,
        properties={FOLDED_PROFILE: base64.b64encode(profile).decode(), FOLDED_FROM: source_id, HOPS: str(hops)},
    ).to_record()


def fold_of(record: dict) -> Fold:
    """The fold in a record `fold_record` wrote (KeyError, ValueError: not one)."""
    properties = record["properties"]
    return Fold(
        record["event_id"],
        record["timestamp"],
        properties[FOLDED_FROM],
        int(properties[HOPS]),
        base64.b64decode(properties[FOLDED_PROFILE], validate=True),
    )


def forwarded_record(event: UserEvent, target_id: str, hops: int) -> dict:
    """The UserEvent record of `event` forwarded to `target_id`."""
    return replace(event, user_id=target_id, properties={**event.properties, HOPS: str(hops)}).to_record()


def hops_of(event: UserEvent) -> int:
    """How many aliases a forwarded event has crossed (0 for an event from the events topic)."""
    held = event.properties.get(HOPS)
    return int(held) if held is not None and held.isdigit() else 0
