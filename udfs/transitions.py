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
from udfs.profile import Membership, UserProfile, update_profile
from udfs.segments import SegmentDefinition, Verdict

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
    """Evaluates a fixed set of segment definitions for one user at a time."""

    def __init__(
        self,
        definitions: Sequence[SegmentDefinition],
        definitions_version: str,
        model_version: str | None = None,
    ):
        self.definitions = tuple(definitions)
        self.definitions_version = definitions_version
        self.model_version = model_version

    def on_event(self, user_id: str, profile: UserProfile, event: UserEvent) -> list[Transition]:
        out = self.advance_to(user_id, profile, event.timestamp)
        update_profile(profile, event)
        if event.timestamp > profile.clock_ms:
            profile.clock_ms = event.timestamp
        self._diff(user_id, profile, profile.clock_ms, "EVENT", event.event_id, out)
        return out

    def advance_to(self, user_id: str, profile: UserProfile, time_ms: int) -> list[Transition]:
        """Moves the user's clock to `time_ms`, emitting every time-driven change due on the way,
        each at the exact instant its condition lapsed."""
        out: list[Transition] = []
        while True:
            due = self.next_change_ms(profile)
            if due is None or due > time_ms:
                break
            profile.clock_ms = due
            self._diff(user_id, profile, due, "TIMER", None, out)
        if time_ms > profile.clock_ms:
            profile.clock_ms = time_ms
        return out

    def next_change_ms(self, profile: UserProfile) -> int | None:
        now = profile.clock_ms
        times = [t for d in self.definitions if (t := d.next_change_ms(profile, now)) is not None]
        return min(times) if times else None

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
            verdict: Verdict = definition.evaluate(profile, now_ms)
            current = profile.memberships.get(definition.name)
            was_member = current is not None and current.member
            if verdict.member == was_member:
                continue
            sequence = (current.sequence if current else 0) + 1
            profile.memberships[definition.name] = Membership(verdict.member, sequence, now_ms)
            out.append(
                Transition(
                    user_id=user_id,
                    segment=definition.name,
                    kind="ENTER" if verdict.member else "EXIT",
                    event_time=now_ms,
                    cause=cause,
                    cause_event_id=cause_event_id,
                    sequence=sequence,
                    definitions_version=self.definitions_version,
                    model_version=self.model_version,
                    rule=verdict.rule,
                    features=verdict.features,
                )
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
