"""Turns events and passing time into segment transitions: evaluate, diff memberships, emit.

The result depends only on each user's event sequence and how far event time has advanced, not on
when the engine's timers happen to fire: an event first advances the user's clock to its own
timestamp (emitting any time-driven change due before it), then applies. So the Flink job, the
backtest and the reference loop all produce the same transitions from the same events.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from udfs.conditions import Evaluation
from udfs.definitions import REMOVED_RULE, DefinitionSet, condition_features, earliest
from udfs.events import UserEvent
from udfs.experiments import CONTROL, TREATMENT, control_places, place
from udfs.identity import MERGED_RULE, Identify, merge_profiles
from udfs.privacy import (
    CONSENT_RULE,
    ERASE,
    ERASURE_RULE,
    MAX_FAN_OUT_HOPS,
    SCORING,
    SCORING_CONSENT_RULE,
    SEGMENTATION,
    PrivacyState,
    UserRequest,
    fan_out_hops,
    fanned_out_erasure,
)
from udfs.profile import ENCODED_BODY, Membership, UserProfile, apply_event, event_id_hash, is_duplicate, prune

RETENTION_RULE = "profile_retention_expired"
# What an erasure's audit lists when the user's privacy record remembered ids folded into them:
# each is erased too (Step.fan_out), and the record forgets them.
ERASED_FOLDS = "identity_folds"

TRANSITION_ID_NAMESPACE = uuid.UUID("6c1f3f0e-8a57-4f3b-9a34-5e4b8d0c2a11")


_NAMESPACE_BYTES = TRANSITION_ID_NAMESPACE.bytes


def transition_id(user_id: str, segment: str, sequence: int) -> str:
    """UUIDv5 (RFC 9562) of the user, segment and sequence in TRANSITION_ID_NAMESPACE: what
    `str(uuid.uuid5(...))` gives, spelled out because that builds two UUID objects and costs
    ~15 us in the keyed thread for each transition."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{user_id}\x1f{segment}\x1f{sequence}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC's variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class Transition:
    """An ENTER or EXIT of a user and a segment, with the rule, the features and scores behind it."""

    user_id: str
    segment: str
    kind: str  # ENTER | EXIT
    event_time: int
    # EVENT | TIMER | ERASURE | CONSENT | MERGE (an identity merge, udfs/identity.py) | DEPLOYMENT
    # (a live deployment switched versions, udfs/deployments.py)
    cause: str
    # the event's id; an ERASURE's or CONSENT's: the request's id; a DEPLOYMENT's: the control record's
    cause_event_id: str | None
    sequence: int
    definitions_version: str
    model_version: str | None
    rule: str
    features: dict[str, float]
    scores: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    arms: dict[str, str] = field(default_factory=dict)  # experiment -> CONTROL | TREATMENT
    provisional: bool = False  # of a cold-start segment (docs/definitions.md)

    @property
    def transition_id(self) -> str:
        """The transition's stable id, from user, segment and sequence (the same on every replay)."""
        return transition_id(self.user_id, self.segment, self.sequence)

    def to_record(self, emitted_at: int) -> dict:
        """The transition as the Avro record of `segment_transition.avsc`."""
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
            "reason": {
                "rule": self.rule,
                "features": self.features,
                "scores": self.scores,
                "labels": self.labels,
                "missing": list(self.missing),
                "provisional": self.provisional,
            },
            "arms": dict(self.arms),
        }


APPLIED, DUPLICATE, LATE, TIMER = "applied", "duplicate", "late", "timer"
# Events not applied for privacy: older than the user's erasure (while its tombstone lasts), or of
# a user without consent to segmentation. Outcomes of step_request: ERASED, CONSENTED.
BURIED, WITHHELD, ERASED, CONSENTED = "buried", "withheld", "erased", "consented"
# The transition cause of an identity merge: the anonymous id's EXITs and the known id's
# re-evaluation (segment_transition.avsc v5).
MERGE = "MERGE"
# The transition cause of a live deployment: the switch to another version at its instant
# (segment_transition.avsc v6; udfs/deployments.py).
DEPLOYMENT = "DEPLOYMENT"


@dataclass(slots=True)
class Step:
    """What one step of one user tells its runner; the runner only translates it to its engine."""

    outcome: str  # APPLIED | DUPLICATE | LATE (events) | TIMER
    transitions: list[Transition]
    register_timer_ms: int | None  # register a timer at this instant (None: the pending one will do)
    drop_state: bool  # nothing of the user is left: delete the stored profile
    expired: bool  # this step ended the user's lifetime (the retention ran out)
    scores_skipped: int = 0  # model scorings skipped: a vector feature had no value and no impute
    scores_out_of_range: int = 0  # scores dropped: NaN, infinite or outside the model's range
    # An erasure or a withdrawn consent emptied the profile: the pending timer at this instant
    # can go (another one left in place from before fires on an empty profile and does nothing).
    delete_timer_ms: int | None = None
    erased: tuple[str, ...] = ()  # an erasure's audit: `profile`, `consent`, `segment:NAME`...
    # An erasure or a withdrawn consent to segmentation: the Redis view deletes every entry of the
    # user up to this sequence, segments the user no longer holds included (the EXITs reach only
    # those they hold). Not a transition: the runner sends it to the view alone (docs/redis.md,
    # "Erasure marker").
    erase_view_up_to: int | None = None
    # An erasure of a user into whom anonymous ids were folded: the erasure of each (the runner
    # delivers them to those ids, at the same instant; docs/privacy.md, "A request names one id").
    fan_out: tuple[UserRequest, ...] = ()
    # A candidate in shadow's transitions (udfs/deployments.py): for the shadow output only.
    shadow_transitions: list[Transition] = field(default_factory=list)


@dataclass(slots=True)
class FoldOut:
    """What an identify tells the runner at the anonymous id: the step (its EXITs, cause MERGE;
    its state is then empty) and the profile to fold into the known id (None when the anonymous
    id held no event: nothing to fold)."""

    step: Step
    folded: UserProfile | None


# Model scores of a profile at an instant; the third argument reads a feature's value at that
# instant from the cache the segment conditions then read too. udfs.scoring.Scorer is one.
ScoreFunction = Callable[[UserProfile, int, Callable[[str], Any]], Mapping[str, float]]


class SegmentEngine:
    """Keeps one user's profile and memberships up to date for one compiled definitions file.
    The profile configuration is the one the definitions were compiled against."""

    def __init__(
        self, definitions: DefinitionSet, model_version: str | None = None, scorer: ScoreFunction | None = None
    ):
        self.definitions = definitions
        self.definitions_version = definitions.version
        self.model_version = model_version
        self.scorer = scorer
        self.catalog = definitions.catalog
        self.config = self.catalog.config
        # The evaluation of the latest diff, reused by next_change_ms at the same instant (the
        # feature reads and lapses are the expensive part of both).
        self._latest: Evaluation | None = None
        self._scoring_seen = (0, 0)  # the scorer's (skipped, out_of_range) at the latest step
        # Whether a user with no consent record for a purpose has consented (docs/privacy.md);
        # runners set it from the settings' consent_default.
        self.consent_default = True
        # segment -> (experiment, control places) of each holdout its conditions read: the arms
        # its transitions record.
        self._experiments = {
            name: tuple((experiment, control_places(share)) for experiment, share in segment.experiments.items())
            for name, segment in definitions.segments.items()
            if segment.experiments
        }

    def is_duplicate(self, profile: UserProfile, event: UserEvent) -> bool:
        """True when the profile has already counted this event (its id seen within the dedup window)."""
        return is_duplicate(profile, event, self.config)

    # -- the per-user step: what every runner (the job, the reference loop, the backtest, replays)
    #    calls, and all it needs back ---------------------------------------------------------------

    def step_event(
        self,
        user_id: str,
        profile: UserProfile,
        event: UserEvent,
        late_before_ms: int | None = None,
        privacy: PrivacyState | None = None,
    ) -> Step:
        """One event of one user: late (its time is before `late_before_ms`, the runner's
        watermark minus the allowed lateness), a duplicate, or applied with the transitions it
        causes (after those that time alone caused before its timestamp). With the user's
        `privacy` record: buried (older than their erasure) or withheld (no consent to
        segmentation) are not applied; without consent to scoring no model runs."""
        if late_before_ms is not None and event.timestamp < late_before_ms:
            return Step(LATE, [], None, profile.is_empty, False)
        refused, scoring = self._privacy_verdict(privacy, event.timestamp)
        if refused is not None:
            return Step(refused, [], None, profile.is_empty, False)
        if is_duplicate(profile, event, self.config):
            return Step(DUPLICATE, [], None, False, False)
        transitions = self._apply(user_id, profile, event, scoring)
        return self._finish(APPLIED, user_id, profile, transitions, False)  # an event leaves a profile

    def step_fold_out(
        self, user_id: str, profile: UserProfile, identify: Identify, late_before_ms: int | None = None
    ) -> FoldOut:
        """An identify at the anonymous id `user_id`: time advances to the identify's timestamp
        (as for an event), the id EXITs every segment it is in (cause MERGE), and its profile is
        handed back to fold into the known id's, leaving this one empty. The runner keeps the
        alias ("merged into the known id", udfs/identity.py) and sends the fold on."""
        ts = identify.timestamp
        if late_before_ms is not None and ts < late_before_ms:
            return FoldOut(Step(LATE, [], None, profile.is_empty, False), None)
        out = self._advance_to_instant(user_id, profile, ts)
        self._exit_members(
            user_id, profile.memberships, profile, profile.clock_ms, MERGE, identify.event_id, MERGED_RULE, {}, out
        )
        folded = None
        if profile.last_by_type:
            folded = UserProfile()
            for f in fields(UserProfile):
                setattr(folded, f.name, getattr(profile, f.name))
            folded.memberships, folded.timer_ms, folded.scores, folded.scored_at_ms = {}, None, {}, None
            folded.derived, folded.next_change_memo = {}, None
        profile.reset()  # new objects: the folded profile keeps the old ones
        return FoldOut(self._finish(APPLIED, user_id, profile, out, False), folded)

    def step_fold_in(
        self,
        user_id: str,
        profile: UserProfile,
        folded: UserProfile,
        cause_event_id: str,
        privacy: PrivacyState | None = None,
        folded_from: str | None = None,
    ) -> Step:
        """An anonymous id's profile (from `step_fold_out`) arrives at the known id `user_id`:
        time advances to the later of the two clocks, the profiles merge (udfs/identity.py), and
        the merged profile is scored and evaluated once, its transitions caused by MERGE with
        the identify's id. The identify's id joins the dedup memory like an event's: a fold
        delivered twice (a broker that hands read_committed readers an aborted transaction's
        records, a replay) is a DUPLICATE, not counted twice. With the known user's `privacy`
        record, the fold is what an event would be: buried when it is older than their erasure,
        withheld without their consent to segmentation (the anonymous profile is not kept), and
        not scored without their consent to scoring. The record remembers `folded_from`, the id
        whose alias now leads here, whatever the verdict: the user's erasure erases it too."""
        seen_key = event_id_hash(cause_event_id)
        seen_at, last = profile.seen_event_ids.get(seen_key), profile.last_event_ms
        if seen_at is not None and last is not None and seen_at > last - self.config.dedup_window_ms:
            return Step(DUPLICATE, [], None, False, False)
        if privacy is not None and folded_from is not None:
            # The alias lasts the retention after the identify; the fold's clock is that instant or later.
            privacy.remember_fold(folded_from, folded.clock_ms + self.config.retention_ms)
        refused, scoring = self._privacy_verdict(privacy, folded.clock_ms)
        if refused is not None:
            return self._fold_timer(Step(refused, [], None, profile.is_empty, False), privacy)
        out = self._advance_to_instant(user_id, profile, max(profile.clock_ms, folded.clock_ms), scoring)
        merge_profiles(profile, folded, self.config)
        profile.seen_event_ids[seen_key] = folded.clock_ms  # the fold's instant: the identify's, or later
        if len(profile.seen_event_ids) > self.config.max_seen_event_ids:
            del profile.seen_event_ids[next(iter(profile.seen_event_ids))]
        prune(profile, self.config)
        expiry = self.retention_expiry_ms(profile)
        if expiry is not None and expiry <= profile.clock_ms:  # both sides had gone quiet for the retention
            clock = profile.clock_ms
            self._expire(user_id, profile, clock, out)
            profile.clock_ms = clock
        else:
            ev = Evaluation(profile, profile.clock_ms, self.catalog, profile.scores, user_id)
            scorer = self.scorer
            if scorer is not None and scoring:
                self._score(scorer, profile, ev)
            self._diff(user_id, profile, ev, MERGE, cause_event_id, out)
        return self._fold_timer(self._finish(APPLIED, user_id, profile, out, False), privacy)

    @staticmethod
    def _fold_timer(step: Step, privacy: PrivacyState | None) -> Step:
        """A user with no profile left and ids folded into them remembered: a timer when the
        first of those is to be forgotten (with a profile, its own timers lead to its expiry)."""
        due = None if privacy is None or not step.drop_state else privacy.next_fold_expiry_ms()
        if due is not None and (step.register_timer_ms is None or due < step.register_timer_ms):
            step.register_timer_ms = due
        return step

    def _privacy_verdict(self, privacy: PrivacyState | None, time_ms: int) -> tuple[str | None, bool]:
        """What the user's `privacy` record says of what happened at `time_ms`: BURIED (older than
        their erasure) or WITHHELD (no consent to segmentation), else None; and whether to score."""
        if privacy is None:
            return (None, True) if self.consent_default else (WITHHELD, False)
        if privacy.buries(time_ms):
            return BURIED, False
        if not privacy.allows(SEGMENTATION, self.consent_default):
            return WITHHELD, False
        return None, privacy.allows(SCORING, self.consent_default)

    def _advance_to_instant(
        self, user_id: str, profile: UserProfile, ts: int, scoring: bool = True
    ) -> list[Transition]:
        """What an event at `ts` does before it applies (`_apply`): the changes due strictly
        before it, then the clock at `ts`, the profile expired when it lapses exactly then."""
        out, _, _ = self._advance(user_id, profile, ts - 1, self._take_memo(profile), scoring)
        if ts > profile.clock_ms:
            profile.clock_ms = ts
            if self.retention_expiry_ms(profile) == ts:
                self._expire(user_id, profile, ts, out)
                profile.clock_ms = ts
        self._latest = None
        return out

    def step_timer(self, user_id: str, profile: UserProfile, time_ms: int, privacy: PrivacyState | None = None) -> Step:
        """Event time reached `time_ms` (a timer fired): every time-driven change due up to it.
        An erasure's tombstone whose time is up goes from the user's `privacy` record, and, once
        the user has no profile, the ids folded into them whose aliases have run out (an alias
        outlives the fold only by the events it forwards here, which keep this profile alive)."""
        scoring = True
        if privacy is not None:
            until = privacy.tombstone_until_ms
            if until is not None and until <= time_ms:
                privacy.erased_at_ms = privacy.tombstone_until_ms = None
            scoring = privacy.allows(SCORING, self.consent_default)
        pending = profile.timer_ms
        if pending is not None and pending <= time_ms:
            profile.timer_ms = None  # it has fired (timers fire in time order, so every earlier one too)
        had_events = bool(profile.last_by_type)
        body = profile.derived.get(ENCODED_BODY)
        out, due, dues = self._advance(user_id, profile, time_ms, self._take_memo(profile), scoring)
        if body is None or profile.derived.get(ENCODED_BODY) is not body:
            # Never changes a result, so `due` stands. Left to the next step that changes the state
            # anyway when this one changed only the clock and the timer: so the body encoded
            # before is written again as it was (the size stays bounded: no step adds anything
            # without pruning).
            prune(profile, self.config)
        profile.next_change_memo = (self, profile.clock_ms, due, dues)
        step = self._finish(TIMER, user_id, profile, out, had_events)
        if privacy is not None and privacy.folded and profile.is_empty:
            privacy.forget_folds_until(time_ms)
        return self._fold_timer(step, privacy)

    def _finish(
        self, outcome: str, user_id: str, profile: UserProfile, transitions: list[Transition], had_events: bool
    ) -> Step:
        """The timer to register: only when the next change is due before the pending timer (or
        none is pending). A later due leaves the earlier timer in place: when it fires, the step
        finds nothing due and asks for the next one. This spares the timer service a delete and
        a register on almost every event (a user active every few minutes pushes a 10-minute
        recency lapse forward each time), at the cost of an occasional early firing."""
        memo = profile.next_change_memo
        if memo is not None and memo[0] is self and memo[1] == profile.clock_ms:
            due = memo[2]  # a timer step that found nothing more due keeps the answer it stopped at
        else:
            due = self.next_change_ms(profile, user_id)
        register = None
        if due is not None and (profile.timer_ms is None or due < profile.timer_ms):
            register = profile.timer_ms = due
        step = Step(outcome, transitions, register, profile.is_empty, had_events and profile.is_empty)
        stats = getattr(self.scorer, "stats", None)  # a Scorer keeps them; a plain scoring callable does not
        if stats is not None:
            skipped, out_of_range = self._scoring_seen
            step.scores_skipped, step.scores_out_of_range = stats.skipped - skipped, stats.out_of_range - out_of_range
            self._scoring_seen = (stats.skipped, stats.out_of_range)
        return step

    # -- live deployments (udfs/deployments.py): a version switch, and a candidate in shadow ---------

    def take_over(
        self,
        previous: SegmentEngine,
        user_id: str,
        profile: UserProfile,
        instant_ms: int,
        deployment_id: str,
        scoring: bool = True,
    ) -> list[Transition]:
        """This engine's version replaces `previous`'s for the user at `instant_ms` (or at the
        user's clock, when it is already past): `previous` first brings the profile there as an
        event at that instant would (the changes due strictly before it), then every unit is
        decided again with this version (cause DEPLOYMENT, the control record's id): segments it
        no longer defines EXIT (REMOVED_RULE), added ones enter, a changed threshold enters or
        exits. A different model version scores the profile again at the instant."""
        out = previous._advance_to_instant(user_id, profile, instant_ms, scoring)
        profile.next_change_memo = None  # no unit's next change holds for other definitions
        if profile.last_event_ms is None:
            return out
        ev = Evaluation(profile, profile.clock_ms, self.catalog, profile.scores, user_id)
        if self.model_version != previous.model_version:
            if self.scorer is not None and scoring:
                self._score(self.scorer, profile, ev)
            elif profile.scores:
                profile.scores = ev.scores = {}
                profile.scored_at_ms = None
                profile.body_changed()
        self._diff(user_id, profile, ev, DEPLOYMENT, deployment_id, out)
        return out

    def shadow_advance(
        self, user_id: str, view: UserProfile, time_ms: int, before: bool, scoring: bool
    ) -> list[Transition]:
        """A candidate in shadow on `view` (the profile with the shadow's memberships, scores and
        clock): the time-driven changes up to `time_ms` (`before`: strictly before it, the clock
        then at it, as for an event at `time_ms`)."""
        if before:
            return self._advance_to_instant(user_id, view, time_ms, scoring)
        out, _, _ = self._advance(user_id, view, time_ms, None, scoring)
        return out

    def shadow_evaluate(
        self, user_id: str, view: UserProfile, cause: str, cause_event_id: str | None, scoring: bool
    ) -> list[Transition]:
        """A candidate in shadow decides every unit on `view` at its clock (after an event, or at
        the shadow's start), scoring first; the next change it waits for is `next_change_ms`."""
        self._latest = None
        view.next_change_memo = None
        out: list[Transition] = []
        if view.last_event_ms is None:
            return out
        ev = Evaluation(view, view.clock_ms, self.catalog, view.scores, user_id)
        if self.scorer is not None and scoring:
            self._score(self.scorer, view, ev)
        self._diff(user_id, view, ev, cause, cause_event_id, out)
        return out

    def step_request(
        self, user_id: str, profile: UserProfile, privacy: PrivacyState, request: UserRequest, tombstone_ms: int
    ) -> Step:
        """A privacy request of one user, at its event time (time-driven changes due before it
        first, as for an event). ERASE: every segment EXITs (cause ERASURE), the profile and the
        consent records go, and for `tombstone_ms` after the request's instant (the runner's
        allowed lateness: after it, the runner drops such events as late) a tombstone buries
        the user's older events. CONSENT: the record changes; a withdrawn segmentation EXITs
        every segment (cause CONSENT) and empties the profile; scoring given or withdrawn
        scores again or drops the scores, and the segments reading them follow (cause CONSENT).
        An ERASE also erases the ids folded into the user (`Step.fan_out`); one that was itself
        fanned out, reaching an id already erased at or after its instant, is a DUPLICATE (two
        ids folded into each other)."""
        if request.kind == ERASE and fan_out_hops(request) and (privacy.erased_at_ms or -1) >= request.timestamp:
            return Step(DUPLICATE, [], None, profile.is_empty, False)
        scoring = privacy.allows(SCORING, self.consent_default)
        out, _, _ = self._advance(user_id, profile, request.timestamp - 1, self._take_memo(profile), scoring)
        if request.timestamp > profile.clock_ms:
            profile.clock_ms = request.timestamp
        self._latest = None
        now_ms, pending = profile.clock_ms, profile.timer_ms
        if request.kind == ERASE:
            erased = [] if profile.is_empty else ["profile"]
            if privacy.consent:
                erased.append("consent")
            erase_up_to = self._view_bound(profile, request.timestamp)
            exits = self._leave_all(user_id, profile, now_ms, "ERASURE", request.request_id, ERASURE_RULE, out)
            erased.extend(f"segment:{name}" for name in exits)
            privacy.consent.clear()
            privacy.erased_at_ms = request.timestamp
            privacy.tombstone_until_ms = request.timestamp + tombstone_ms
            fan_out: tuple[UserRequest, ...] = ()
            if privacy.folded:
                erased.append(ERASED_FOLDS)
                if fan_out_hops(request) < MAX_FAN_OUT_HOPS:  # beyond: a chain this long is a loop
                    fan_out = tuple(fanned_out_erasure(request, folded_id) for folded_id in privacy.folded)
                privacy.folded = {}
            return Step(
                ERASED,
                out,
                privacy.tombstone_until_ms,
                True,
                False,
                0,
                0,
                pending,
                tuple(erased),
                erase_up_to,
                fan_out,
            )
        purpose, granted = request.purpose, bool(request.granted)
        before = privacy.allows(SEGMENTATION, self.consent_default), scoring
        if purpose is not None:
            if granted == self.consent_default:
                privacy.consent.pop(purpose, None)
            else:
                privacy.consent[purpose] = (granted, request.timestamp)
        segmenting = privacy.allows(SEGMENTATION, self.consent_default)
        scoring = privacy.allows(SCORING, self.consent_default)
        if before[0] and not segmenting:
            erase_up_to = self._view_bound(profile, request.timestamp)
            self._leave_all(user_id, profile, now_ms, "CONSENT", request.request_id, CONSENT_RULE, out)
            return Step(CONSENTED, out, None, True, False, 0, 0, pending, (), erase_up_to)
        if segmenting and before[1] != scoring and profile.last_event_ms is not None:
            ev = Evaluation(profile, now_ms, self.catalog, profile.scores, user_id)
            if scoring and self.scorer is not None:
                self._score(self.scorer, profile, ev)
            elif not scoring:
                profile.scores = ev.scores = {}
                profile.scored_at_ms = None
                profile.body_changed()
                self._leave_scored(user_id, profile, now_ms, request.request_id, out)
            self._diff(user_id, profile, ev, "CONSENT", request.request_id, out)
        return self._finish(CONSENTED, user_id, profile, out, False)

    @staticmethod
    def _view_bound(profile: UserProfile, request_ms: int) -> int:
        """The Redis view's erasure bound of a lifetime ending at a request: above every sequence
        of it (its EXITs included) and of earlier ones, below those of a return at or after the
        request (udfs/profile.py: sequence_base)."""
        return max([request_ms * 1000] + [m.sequence + 1 for m in profile.memberships.values()])

    def _leave_scored(
        self, user_id: str, profile: UserProfile, now_ms: int, request_id: str, out: list[Transition]
    ) -> None:
        """EXITs every segment the user is in whose conditions read a model score (cause CONSENT):
        made from profiling the user withdrew from, and a missing score meets no exit condition."""
        for name, segment in self.definitions.segments.items():
            membership = profile.memberships.get(name)
            reads_scores = any(c is not None and c.references.scores for c in (segment.enter, segment.exit))
            if membership is None or not membership.member or not reads_scores:
                continue
            sequence = membership.sequence + 1
            profile.memberships[name] = Membership(False, sequence, now_ms)
            out.append(
                self._transition(
                    user_id,
                    name,
                    False,
                    sequence,
                    now_ms,
                    "CONSENT",
                    request_id,
                    SCORING_CONSENT_RULE,
                    {},
                    profile,
                    segment.provisional,
                )
            )

    def _leave_all(
        self,
        user_id: str,
        profile: UserProfile,
        now_ms: int,
        cause: str,
        request_id: str,
        rule: str,
        out: list[Transition],
    ) -> list[str]:
        """EXITs every segment the user is in, with no feature nor score (the user asked that
        nothing more be made of their data), and empties the profile. Returns the segments left."""
        memberships = profile.memberships
        profile.reset()  # first: the EXITs then carry no score
        return self._exit_members(user_id, memberships, profile, now_ms, cause, request_id, rule, {}, out)

    def on_event(self, user_id: str, profile: UserProfile, event: UserEvent) -> list[Transition]:
        """The transitions of `step_event` (a duplicate changes nothing)."""
        return self.step_event(user_id, profile, event).transitions

    def advance_to(self, user_id: str, profile: UserProfile, time_ms: int) -> list[Transition]:
        """Moves the user's clock to `time_ms`, emitting every time-driven change due on the way,
        each at the exact instant its condition lapsed. When the retention runs out, the user
        exits every segment and the profile is emptied (`profile.is_empty`: delete its state)."""
        return self.step_timer(user_id, profile, time_ms).transitions

    def _apply(self, user_id: str, profile: UserProfile, event: UserEvent, scoring: bool) -> list[Transition]:
        # Changes due strictly before the event come first; one due at its very timestamp is
        # decided with the event (as in Flink, where a timer at T fires only once the watermark
        # passes T, i.e. after every event at T that is not late). The retention is the
        # exception: a profile silent for exactly retention_ms has expired, and the event starts
        # a new lifetime.
        out, _, dues = self._advance(user_id, profile, event.timestamp - 1, self._take_memo(profile), scoring)
        if event.timestamp > profile.clock_ms:
            profile.clock_ms = event.timestamp
            if self.retention_expiry_ms(profile) == event.timestamp:
                self._expire(user_id, profile, event.timestamp, out)
                profile.clock_ms = event.timestamp
                dues = None
        self._latest = None
        apply_event(profile, event, self.config)
        prune(profile, self.config)
        ev = Evaluation(profile, profile.clock_ms, self.catalog, profile.scores, user_id)
        scorer = self.scorer
        if scorer is not None and scoring:
            self._score(scorer, profile, ev)
        scored = scorer is not None and scoring
        reached = None if dues is None else self.definitions.reached(dues, ev.now, event.event_type, scored)
        self._diff(user_id, profile, ev, "EVENT", event.event_id, out, reached)
        due, dues = self._next_change(profile, user_id, dues, reached)
        profile.next_change_memo = (self, profile.clock_ms, due, dues)
        return out

    def _take_memo(self, profile: UserProfile) -> tuple[int | None, list[int | None] | None] | None:
        memo, profile.next_change_memo = profile.next_change_memo, None
        if memo is not None and memo[0] is self and memo[1] == profile.clock_ms:
            return memo[2], memo[3]
        return None

    def _advance(
        self,
        user_id: str,
        profile: UserProfile,
        time_ms: int,
        memo: tuple[int | None, list[int | None] | None] | None,
        scoring: bool = True,
    ) -> tuple[list[Transition], int | None, list[int | None] | None]:
        """The time-driven transitions up to `time_ms`, and the next change after it: the instant
        the walk stopped at, which nothing between the last evaluation and `time_ms` can move,
        with each unit's next change (None: not worked out)."""
        out: list[Transition] = []
        # `memo`: this engine answered at this very clock, on this very state. Units' next changes
        # are only kept from an evaluation that decided every unit or kept it from one: without
        # them, the next evaluation decides every unit (the stored memberships may be another
        # engine's: other definitions, or a profile read back from state).
        if memo is not None:
            due, dues = memo
        else:
            due, dues = self._next_change(profile, user_id, None, None)[0], None
        while due is not None and due <= time_ms:
            # Only a retention expiry can lie behind the clock (a late event older than the
            # retention, applied after the clock passed its expiry): it happens now, and the clock
            # never goes back.
            due = max(due, profile.clock_ms)
            expiry = self.retention_expiry_ms(profile)
            profile.clock_ms = due
            if expiry is not None and expiry <= due:
                self._expire(user_id, profile, due, out)
                due, dues = self._next_change(profile, user_id, None, None)
                continue
            ev = Evaluation(profile, due, self.catalog, profile.scores, user_id)
            scorer = self.scorer
            scored = False
            # Never due without a scorer, nor without consent to scoring (no scoring instant).
            if scorer is not None and scoring and due == self.rescore_due_ms(profile):
                scored = True
                self._latest = None
                self._score(scorer, profile, ev)
            reached = None if dues is None else self.definitions.reached(dues, due, None, scored)
            self._diff(user_id, profile, ev, "TIMER", None, out, reached)
            due, dues = self._next_change(profile, user_id, dues, reached)
        if time_ms > profile.clock_ms:
            profile.clock_ms = time_ms
        return out, due, dues

    def _score(self, scorer: ScoreFunction, profile: UserProfile, ev: Evaluation) -> None:
        """The models read their vectors through `ev`'s feature cache, which the conditions
        then read too; features do not depend on scores, so the cache stays valid."""
        profile.scores = ev.scores = dict(scorer(profile, ev.now, ev.feature))
        profile.scored_at_ms = ev.now
        profile.body_changed()

    def rescore_due_ms(self, profile: UserProfile) -> int | None:
        """Scores are computed at every accepted event, and with `rescore_every` in the
        definitions also that long after the latest scoring while no event comes: features
        such as recency keep moving, and a churn score should rise as a user goes quiet."""
        every = self.definitions.rescore_every_ms
        if self.scorer is None or not every or profile.scored_at_ms is None:
            return None
        return profile.scored_at_ms + every

    def retention_expiry_ms(self, profile: UserProfile) -> int | None:
        """The instant the profile lapses if no further event comes, or None when it holds no event."""
        last = profile.last_event_ms
        return None if last is None else last + self.config.retention_ms

    def next_change_ms(self, profile: UserProfile, user_id: str | None = None) -> int | None:
        """The one instant the user's timer is set for: the earliest at which a verdict can
        change, or the profile expires.

        Adapters ask after every event and timer, and the engine's next call starts by asking
        the same question of the same state (is a change due before the event?): the answer is
        kept on the profile object until that call, which is the only thing that changes it
        (the timer_ms an adapter writes is not read here). Definitions with a holdout(...) need
        the user's id."""
        due = self._next_change(profile, user_id, None, None)[0]
        # No units' next changes kept: nothing says this engine has decided them on this state.
        profile.next_change_memo = (self, profile.clock_ms, due, None)
        return due

    def _next_change(
        self,
        profile: UserProfile,
        user_id: str | None,
        dues: list[int | None] | None,
        reached: list[bool] | None,
    ) -> tuple[int | None, list[int | None] | None]:
        """The next change and each unit's: worked out again for the `reached` units of the
        evaluation just made (every unit without `dues`), the others' kept from `dues`."""
        if profile.last_event_ms is None:
            return None, None
        ev = self._latest
        if ev is None or ev.profile is not profile or ev.now != profile.clock_ms or ev.scores is not profile.scores:
            ev = Evaluation(profile, profile.clock_ms, self.catalog, profile.scores, user_id)
        dues = self.definitions.unit_dues(ev, profile.memberships, dues, reached)
        due = earliest(dues)
        for other in (self.retention_expiry_ms(profile), self.rescore_due_ms(profile)):
            if other is not None and (due is None or other < due):
                due = other
        return due, dues

    def features(self, profile: UserProfile, now_ms: int) -> dict:
        """Every feature of the profile at `now_ms`, by name."""
        return self.catalog.all(profile, now_ms)

    def _expire(self, user_id: str, profile: UserProfile, now_ms: int, out: list[Transition]) -> None:
        idle = {"ms_since_last_event": float(self.config.retention_ms)}
        self._exit_members(user_id, profile.memberships, profile, now_ms, "TIMER", None, RETENTION_RULE, idle, out)
        profile.reset()

    def _exit_members(
        self,
        user_id: str,
        memberships: Mapping[str, Membership],
        profile: UserProfile,
        now_ms: int,
        cause: str,
        cause_event_id: str | None,
        rule: str,
        values: Mapping[str, object],
        out: list[Transition],
    ) -> list[str]:
        """An EXIT of every segment of `memberships` the user is in, with the scores `profile`
        holds (the retention's, a merge's, an erasure's or a withdrawn consent's); their names."""
        left = []
        for name, membership in memberships.items():
            if membership.member:
                segment = self.definitions.segments.get(name)
                provisional = segment is not None and segment.provisional
                out.append(
                    self._transition(
                        user_id,
                        name,
                        False,
                        membership.sequence + 1,
                        now_ms,
                        cause,
                        cause_event_id,
                        rule,
                        values,
                        profile,
                        provisional,
                    )
                )
                left.append(name)
        return left

    def _diff(
        self,
        user_id: str,
        profile: UserProfile,
        ev: Evaluation,
        cause: str,
        cause_event_id: str | None,
        out: list[Transition],
        reached: list[bool] | None = None,
    ) -> None:
        self._latest = ev
        now_ms = ev.now
        changed = self.definitions.changes(ev, profile.memberships, reached)
        if not changed:
            return
        profile.body_changed()
        # Exits first: a user moving between the tiers of a group leaves one before entering the next.
        changed.sort(key=lambda e: e[1] is not None and e[1].member)
        for name, verdict in changed:
            current = profile.memberships.get(name)
            member = verdict is not None and verdict.member
            sequence = (current.sequence if current else profile.sequence_base) + 1
            profile.memberships[name] = Membership(member, sequence, now_ms)
            if verdict is None:
                rule, values = REMOVED_RULE, {}
            else:
                rule, values = verdict.rule, condition_features(verdict.condition, ev)
            segment = self.definitions.segments.get(name)  # None: a segment no longer defined
            provisional = segment is not None and segment.provisional
            out.append(
                self._transition(
                    user_id, name, member, sequence, now_ms, cause, cause_event_id, rule, values, profile, provisional
                )
            )

    def _transition(
        self, user_id, segment, member, sequence, now_ms, cause, cause_event_id, rule, values, profile, provisional
    ) -> Transition:
        features: dict[str, float] = {}
        labels: dict[str, str] = {}
        missing: list[str] = []
        for label, value in values.items():
            if value is None:
                missing.append(label)
            elif isinstance(value, bool):
                features[label] = 1.0 if value else 0.0
            elif isinstance(value, int | float):
                if math.isfinite(value):
                    features[label] = float(value)
                else:
                    missing.append(label)
            elif isinstance(value, str):
                labels[label] = value
            else:
                labels[label] = ",".join(map(str, value))
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
            rule=rule,
            features=features,
            scores=dict(profile.scores),
            labels=labels,
            missing=tuple(missing),
            arms=self._arms(segment, user_id),
            provisional=provisional,
        )

    def _arms(self, segment: str, user_id: str) -> dict[str, str]:
        """The user's arm in each experiment the segment's conditions split by."""
        experiments = self._experiments.get(segment)
        if experiments is None:
            return {}
        return {name: CONTROL if place(name, user_id) < places else TREATMENT for name, places in experiments}


def replay_events(
    engine: SegmentEngine, events: Sequence[UserEvent | Identify], until_ms: int | None = None
) -> tuple[list[Transition], dict[str, UserProfile]]:
    """Brings every user through `events` in the given order, then lets time pass up to `until_ms`
    (the final watermark), as the job does. The expected output for tests and the backtest.
    An identify record folds the anonymous id into the known id and sends its later events there
    (udfs/identity_replay.py: the backtest's merge, the fold delivered at once)."""
    # Here, not at the top: udfs.identity_replay imports this module.
    from udfs.identity_replay import IdentityReplay

    profiles: dict[str, UserProfile] = {}
    out: list[Transition] = []
    identities = IdentityReplay(engine, profiles, out, {})
    for record in events:
        if isinstance(record, Identify):
            identities.identify(record)
            continue
        user_id = identities.route(record.user_id, record.timestamp)
        if user_id is None:  # the aliases loop: the job dead-letters the event
            continue
        event = record if user_id == record.user_id else replace(record, user_id=user_id)
        profile = profiles.setdefault(user_id, UserProfile())
        out.extend(engine.step_event(user_id, profile, event).transitions)
    if until_ms is not None:
        for user_id, profile in profiles.items():
            out.extend(engine.step_timer(user_id, profile, until_ms).transitions)
    return out, profiles
