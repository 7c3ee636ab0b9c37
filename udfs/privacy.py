"""Privacy requests (erasure, consent) and what the core keeps of them per user.

A `UserRequest` comes from the requests topic (schemas/user_request.avsc) or `segments forget`;
SegmentEngine.step_request (udfs/transitions.py) applies it, so the job and the backtest give it
the same meaning. `PrivacyState` is the per-user record the runner keeps beside the profile: the
consent records that differ from the default, and, for a bounded time after an erasure, the
tombstone that keeps the user's older events from rebuilding a profile (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgpack

from udfs.codec import DecodeError
from udfs.events import MAX_ID_LENGTH, MIN_EVENT_TIME_MS

ERASE, CONSENT = "ERASE", "CONSENT"
SEGMENTATION, PERSONALISATION, SCORING = "SEGMENTATION", "PERSONALISATION", "SCORING"
PURPOSES = (SEGMENTATION, PERSONALISATION, SCORING)
# The rules of the EXITs an erasure and a withdrawn segmentation consent make (the Redis view's
# apply script deletes the user's keys on them, as on the retention's EXIT).
ERASURE_RULE = "user_erased"
CONSENT_RULE = "consent_withdrawn"
# The rule of the EXITs from the segments that read a model score when scoring consent goes (their
# hysteresis would otherwise keep the user in: a missing score satisfies no exit condition).
SCORING_CONSENT_RULE = "scoring_consent_withdrawn"

_LAYOUT_VERSION = 1


@dataclass(frozen=True, slots=True)
class UserRequest:
    """A validated privacy request, as the contract's `UserRequest` record describes it."""

    request_id: str
    user_id: str
    kind: str  # ERASE | CONSENT
    timestamp: int
    source: str
    purpose: str | None = None  # CONSENT only
    granted: bool | None = None  # CONSENT only

    def to_record(self) -> dict:
        """The request as the Avro record of `user_request.avsc`."""
        return {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "kind": self.kind,
            "timestamp": self.timestamp,
            "purpose": self.purpose,
            "granted": self.granted,
            "source": self.source,
        }


def request_from_record(record: dict) -> UserRequest:
    """The request a decoded record holds, or a DecodeError with the dead-letter reason."""
    request_id, user_id, kind, timestamp = record["request_id"], record["user_id"], record["kind"], record["timestamp"]
    if not user_id:
        raise DecodeError("missing_user_id", "user_id is empty")
    if len(user_id) > MAX_ID_LENGTH or not request_id or len(request_id) > MAX_ID_LENGTH:
        raise DecodeError("invalid_field", f"request_id and user_id must be 1 to {MAX_ID_LENGTH} characters")
    if timestamp < MIN_EVENT_TIME_MS:
        raise DecodeError("absurd_timestamp", f"timestamp {timestamp} is before {MIN_EVENT_TIME_MS}")
    purpose, granted = record.get("purpose"), record.get("granted")
    if kind == CONSENT and (purpose not in PURPOSES or granted is None):
        raise DecodeError("invalid_field", "a CONSENT request needs a purpose and granted")
    if kind == ERASE and (purpose is not None or granted is not None):
        raise DecodeError("invalid_field", "an ERASE request has no purpose nor granted")
    return UserRequest(request_id, user_id, kind, timestamp, record["source"], purpose, granted)


def user_hash(user_id: str) -> str:
    """What the audit trail and the logs hold instead of a user id: hex SHA-256 of its UTF-8."""
    return hashlib.sha256(user_id.encode()).hexdigest()


@dataclass(slots=True)
class PrivacyState:
    """One user's privacy record. `consent`: purpose -> (granted, since_ms), only where it differs
    from the default (the default honours the rest). `erased_at_ms`: the instant of the latest
    erasure while its tombstone lasts, until `tombstone_until_ms`."""

    consent: dict[str, tuple[bool, int]] = field(default_factory=dict)
    erased_at_ms: int | None = None
    tombstone_until_ms: int | None = None

    def allows(self, purpose: str, default: bool) -> bool:
        """Whether the user has consented to `purpose`: their record, else the default."""
        record = self.consent.get(purpose)
        return default if record is None else record[0]

    @property
    def is_empty(self) -> bool:
        """True when nothing needs keeping: delete the stored record."""
        return not self.consent and self.erased_at_ms is None

    def buries(self, event_time_ms: int) -> bool:
        """True when an event at this time belongs to an erased past and must not be applied."""
        erased = self.erased_at_ms
        return erased is not None and event_time_ms < erased


def encode_privacy(state: PrivacyState) -> bytes:
    """The record's keyed-state form: a MessagePack array (version, erased_at, until, consent)."""
    consent = [[purpose, granted, since] for purpose, (granted, since) in sorted(state.consent.items())]
    packed: bytes = msgpack.packb([_LAYOUT_VERSION, state.erased_at_ms, state.tombstone_until_ms, consent])
    return packed


def decode_privacy(stored: bytes | None) -> PrivacyState:
    """The record `encode_privacy` wrote (an empty one for None), or a DecodeError."""
    if stored is None:
        return PrivacyState()
    try:
        version, erased_at, until, consent = msgpack.unpackb(stored)
        if version != _LAYOUT_VERSION:
            raise DecodeError("undecodable", f"privacy state layout {version} is not known")
        state = PrivacyState({}, erased_at, until)
        for purpose, granted, since in consent:
            if purpose not in PURPOSES or not isinstance(granted, bool) or not isinstance(since, int):
                raise DecodeError("undecodable", "privacy state: a consent record is malformed")
            state.consent[purpose] = (granted, since)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises many types on damaged input; all mean the same
        raise DecodeError("undecodable", f"privacy state ({type(exc).__name__})") from None
    if not (erased_at is None or isinstance(erased_at, int)) or not (until is None or isinstance(until, int)):
        raise DecodeError("undecodable", "privacy state: instants must be integers")
    return state
