"""Turns events and passing time into segment transitions: evaluate, diff memberships, emit.

The result depends only on each user's event sequence and how far event time has advanced, not on
when the engine's timers happen to fire: an event first advances the user's clock to its own
timestamp (emitting any time-driven change due before it), then applies. So the Flink job, the
backtest and the reference loop all produce the same transitions from the same events.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from udfs.events import UserEvent
from udfs.features import FeatureCatalog
from udfs.profile import Membership, UserProfile, apply_event, is_duplicate, prune
from udfs.profile_config import ProfileConfig
from udfs.segments import SegmentDefinition, Verdict

RETENTION_RULE = "profile_retention_expired"

TRANSITION_ID_NAMESPACE = uuid.UUID("6c1f3f0e-8a57-4f3b-9a34-5e4b8d0c2a11")


def transition_id(user_id: str, segment: str, sequence: int) -> str:
    return str(uuid.uuid5(TRANSITION_ID_NAMESPACE, f"{user_id}\x1f{segment}\x1f{sequence}"))


@dataclass(frozen=True, slots=True)
class Transition:
    user_id: str
    segment: str
    kind: str  # ENTER | EXIT
    event_time: int
    cause: str  # EVENT | TIMER
    cause_event_id: str | None
    sequence: int
    definitions_version: str
    model_version: str | None
    rule: str
    features: dict[str, float]
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def transition_id(self) -> str:
        return transition_id(self.user_id, self.segment, self.sequence)

    def to_record(self, emitted_at: int) -> dict:
        return {
            "transition_id": self.transition_id,
            "user_id": self.user_id,
            "segment": self.segment,
            "kind": self.kind,
            "event_time": self.event_time,
            "emitted_at": emitted_at,
            "cause": self.cause,
            "cause_event_id": self.cause_event_id,
            "sequence": self.sequence,
            "definitions_version": self.definitions_version,
            "model_version": self.model_version,
            "reason": {"rule": self.rule, "features": self.features, "scores": self.scores},
        }


class SegmentEngine:
    """Keeps one user's profile and memberships up to date for a fixed set of definitions."""

    def __init__(
        self,
        definitions: Sequence[SegmentDefinition],
        definitions_version: str,
        model_version: str | None = None,
        profile_config: ProfileConfig | None = None,
    ):
        self.definitions = tuple(definitions)
        self.definitions_version = definitions_version
        self.model_version = model_version
        self.config = profile_config or ProfileConfig()
        self.catalog = FeatureCatalog(self.config)

    def is_duplicate(self, profile: UserProfile, event: UserEvent) -> bool:
        return is_duplicate(profile, event, self.config)

    def on_event(self, user_id: str, profile: UserProfile, event: UserEvent) -> list[Transition]:
        """Applies an event (a duplicate changes nothing) and returns the transitions it causes,
        after those that time alone caused before the event's timestamp."""
        if self.is_duplicate(profile, event):
            return []
        return self.on_accepted_event(user_id, profile, event)

    def on_accepted_event(self, user_id: str, profile: UserProfile, event: UserEvent) -> list[Transition]:
        """`on_event` for a caller that has already checked `is_duplicate` (the job counts them)."""
        out = self._advance(user_id, profile, event.timestamp)
        apply_event(profile, event, self.config)
        prune(profile, self.config)
        self._diff(user_id, profile, profile.clock_ms, "EVENT", event.event_id, out)
        return out

    def advance_to(self, user_id: str, profile: UserProfile, time_ms: int) -> list[Transition]:
        """Moves the user's clock to `time_ms`, emitting every time-driven change due on the way,
        each at the exact instant its condition lapsed. When the retention runs out, the user
        exits every segment and the profile is emptied (`profile.is_empty`: delete its state)."""
        out = self._advance(user_id, profile, time_ms)
        prune(profile, self.config)
        return out

    def _advance(self, user_id: str, profile: UserProfile, time_ms: int) -> list[Transition]:
        out: list[Transition] = []
        while True:
            due = self.next_change_ms(profile)
            if due is None or due > time_ms:
                break
            profile.clock_ms = due
            if due == self.retention_expiry_ms(profile):
                self._expire(user_id, profile, due, out)
            else:
                self._diff(user_id, profile, due, "TIMER", None, out)
        if time_ms > profile.clock_ms:
            profile.clock_ms = time_ms
        return out

    def retention_expiry_ms(self, profile: UserProfile) -> int | None:
        last = profile.last_event_ms
        return None if last is None else last + self.config.retention_ms

    def next_change_ms(self, profile: UserProfile) -> int | None:
        """The one instant the user's timer is set for: the earliest at which a verdict can
        change, or the profile expires."""
        now = profile.clock_ms
        times = [t for d in self.definitions if (t := d.next_change_ms(profile, now, self.catalog)) is not None]
        expiry = self.retention_expiry_ms(profile)
        if expiry is not None:
            times.append(expiry)
        return min(times) if times else None

    def features(self, profile: UserProfile, now_ms: int) -> dict:
        return self.catalog.all(profile, now_ms)

    def _expire(self, user_id: str, profile: UserProfile, now_ms: int, out: list[Transition]) -> None:
        idle = {"ms_since_last_event": float(self.config.retention_ms)}
        for name, membership in profile.memberships.items():
            if membership.member:
                out.append(self._transition(user_id, name, False, membership.sequence + 1, now_ms, "TIMER", None,
                                            Verdict(False, RETENTION_RULE, idle)))
        profile.reset()

    def _diff(
        self,
        user_id: str,
        profile: UserProfile,
        now_ms: int,
        cause: str,
        cause_event_id: str | None,
        out: list[Transition],
    ) -> None:
        for definition in self.definitions:
            verdict: Verdict = definition.evaluate(profile, now_ms, self.catalog)
            current = profile.memberships.get(definition.name)
            was_member = current is not None and current.member
            if verdict.member == was_member:
                continue
            sequence = (current.sequence if current else profile.sequence_base) + 1
            profile.memberships[definition.name] = Membership(verdict.member, sequence, now_ms)
            out.append(self._transition(user_id, definition.name, verdict.member, sequence, now_ms, cause,
                                        cause_event_id, verdict))

    def _transition(self, user_id, segment, member, sequence, now_ms, cause, cause_event_id, verdict) -> Transition:
        return Transition(
            user_id=user_id,
            segment=segment,
            kind="ENTER" if member else "EXIT",
            event_time=now_ms,
            cause=cause,
            cause_event_id=cause_event_id,
            sequence=sequence,
            definitions_version=self.definitions_version,
            model_version=self.model_version,
            rule=verdict.rule,
            features=verdict.features,
        )


def replay_events(
    engine: SegmentEngine, events: Sequence[UserEvent], until_ms: int | None = None
) -> tuple[list[Transition], dict[str, UserProfile]]:
    """Brings every user through `events` in the given order, then lets time pass up to `until_ms`
    (the final watermark), as the job does. The expected output for tests and the backtest."""
    profiles: dict[str, UserProfile] = {}
    out: list[Transition] = []
    for event in events:
        profile = profiles.setdefault(event.user_id, UserProfile())
        out.extend(engine.on_event(event.user_id, profile, event))
    if until_ms is not None:
        for user_id, profile in profiles.items():
            out.extend(engine.advance_to(user_id, profile, until_ms))
    return out, profiles
