"""Privacy requests (erasure, consent) and what the core keeps of them per user.

A `UserRequest` comes from the requests topic (schemas/user_request.avsc) or `segments forget`;
SegmentEngine.step_request (udfs/transitions.py) applies it, so the job and the backtest give it
the same meaning. `PrivacyState` is the per-user record the runner keeps beside the profile: the
consent records that differ from the default, for a bounded time after an erasure the tombstone
that keeps the user's older events from rebuilding a profile, and the anonymous ids folded into
the user, which the user's erasure erases too (docs/privacy.md).
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
# What an erasure's audit record names when it removed the id's alias (keyed state of the runner:
# the id was merged into another user).
ERASED_ALIAS = "identity_alias"

# 1: (version, erased_at, until, consent); 2: and the folded-in ids. Both are read.
_LAYOUT_VERSION = 2
# How many ids folded into one user the record remembers (the oldest forgotten first): an
# erasure reaches those (docs/privacy.md, "A request names one id").
MAX_FOLDED_IDS = 64
# The source of an erasure fanned out to an id folded into an erased user: this, then the source
# of the request it came from (once per hop: the count bounds a chain, MAX_FAN_OUT_HOPS).
FAN_OUT_SOURCE = "folded-into-erased:"
MAX_FAN_OUT_HOPS = 4


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


def fan_out_hops(request: UserRequest) -> int:
    """How many erasures this one was fanned out through (0: asked for this id itself)."""
    hops, source = 0, request.source
    while source.startswith(FAN_OUT_SOURCE):
        hops, source = hops + 1, source[len(FAN_OUT_SOURCE) :]
    return hops


def fanned_out_erasure(request: UserRequest, folded_id: str) -> UserRequest:
    """The erasure of `folded_id`, folded into the user `request` erases: the same instant, the
    request's id with the folded id's hash (bounded like any request id), a source that says so."""
    suffix = "+" + user_hash(folded_id)[:16]
    request_id = request.request_id[: MAX_ID_LENGTH - len(suffix)] + suffix
    return UserRequest(request_id, folded_id, ERASE, request.timestamp, FAN_OUT_SOURCE + request.source)


@dataclass(slots=True)
class PrivacyState:
    """One user's privacy record. `consent`: purpose -> (granted, since_ms), only where it differs
    from the default (the default honours the rest). `erased_at_ms`: the instant of the latest
    erasure while its tombstone lasts, until `tombstone_until_ms`. `folded`: anonymous id ->
    until when its alias links it to this user (at least), oldest fold first, at most
    MAX_FOLDED_IDS."""

    consent: dict[str, tuple[bool, int]] = field(default_factory=dict)
    erased_at_ms: int | None = None
    tombstone_until_ms: int | None = None
    folded: dict[str, int] = field(default_factory=dict)

    def allows(self, purpose: str, default: bool) -> bool:
        """Whether the user has consented to `purpose`: their record, else the default."""
        record = self.consent.get(purpose)
        return default if record is None else record[0]

    @property
    def is_empty(self) -> bool:
        """True when nothing needs keeping: delete the stored record."""
        return not self.consent and self.erased_at_ms is None and not self.folded

    def buries(self, event_time_ms: int) -> bool:
        """True when an event at this time belongs to an erased past and must not be applied."""
        erased = self.erased_at_ms
        return erased is not None and event_time_ms < erased

    def remember_fold(self, folded_id: str, until_ms: int) -> None:
        """`folded_id` was folded into this user, its alias lasting until `until_ms`."""
        folded = self.folded
        until_ms = max(until_ms, folded.pop(folded_id, until_ms))
        folded[folded_id] = until_ms  # the latest fold last: the cap forgets the oldest
        if len(folded) > MAX_FOLDED_IDS:
            del folded[next(iter(folded))]

    def forget_folds_until(self, time_ms: int) -> None:
        """Forgets the folded ids whose alias has run out by `time_ms`."""
        self.folded = {folded_id: until for folded_id, until in self.folded.items() if until > time_ms}

    def next_fold_expiry_ms(self) -> int | None:
        """When the next folded id is to be forgotten (None: none is remembered)."""
        return min(self.folded.values(), default=None)


def encode_privacy(state: PrivacyState) -> bytes:
    """The record's keyed-state form: a MessagePack array (version, erased_at, until, consent,
    folded), folded as [id, until] pairs, oldest fold first."""
    consent = [[purpose, granted, since] for purpose, (granted, since) in sorted(state.consent.items())]
    folded = [[folded_id, until] for folded_id, until in state.folded.items()]
    packed: bytes = msgpack.packb([_LAYOUT_VERSION, state.erased_at_ms, state.tombstone_until_ms, consent, folded])
    return packed


def decode_privacy(stored: bytes | None) -> PrivacyState:
    """The record `encode_privacy` wrote (an empty one for None), or a DecodeError."""
    if stored is None:
        return PrivacyState()
    try:
        unpacked = msgpack.unpackb(stored)
        version = unpacked[0]
        if version == 1:  # written before the folded ids were kept
            _, erased_at, until, consent = unpacked
            folded = []
        elif version == _LAYOUT_VERSION:
            _, erased_at, until, consent, folded = unpacked
        else:
            raise DecodeError("undecodable", f"privacy state layout {version} is not known")
        state = PrivacyState({}, erased_at, until)
        for purpose, granted, since in consent:
            if purpose not in PURPOSES or not isinstance(granted, bool) or not isinstance(since, int):
                raise DecodeError("undecodable", "privacy state: a consent record is malformed")
            state.consent[purpose] = (granted, since)
        for folded_id, folded_until in folded:
            if not isinstance(folded_id, str) or not isinstance(folded_until, int):
                raise DecodeError("undecodable", "privacy state: a folded id is malformed")
            state.folded[folded_id] = folded_until
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises many types on damaged input; all mean the same
        raise DecodeError("undecodable", f"privacy state ({type(exc).__name__})") from None
    if not (erased_at is None or isinstance(erased_at, int)) or not (until is None or isinstance(until, int)):
        raise DecodeError("undecodable", "privacy state: instants must be integers")
    return state
