"""The job's identity merge in one process: what the backtest and `replay_events` run for identify
records (docs/architecture.md, "Identity merge across keys").

The job's cross-key protocol reduces to this in a single process: the fold the job sends through
its feedback topic is delivered at once, and the alias it keeps in the anonymous id's keyed state
is a dict entry. Both runners call the same per-user steps as the job (`step_fold_out`,
`step_fold_in`), so their transitions are the job's for a log in which each fold reaches the known
id before that id's next record (the feedback topic's delay is the only difference). An erasure
of a user erases the ids folded into them the same way: the requests the job sends through its
feedback topic are applied at once.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

from udfs.identity import MAX_ALIAS_HOPS, Alias, Identify, forward_target
from udfs.privacy import ERASED_ALIAS, PrivacyState, UserRequest, user_hash
from udfs.profile import UserProfile
from udfs.transitions import ERASED, LATE, SegmentEngine, Transition


@dataclass(frozen=True)
class Erasure:
    """What the job's audit record of an erasure says, but for its wall-clock `erased_at`."""

    request_id: str
    user_hash: str
    requested_at: int
    source: str
    erased: tuple[str, ...]


class IdentityReplay:
    """The aliases the job keeps per anonymous id, and the folds it sends, replayed over the
    runner's own profiles, privacy records and transitions list (all shared, updated in place)."""

    def __init__(
        self,
        engine: SegmentEngine,
        profiles: dict[str, UserProfile],
        transitions: list[Transition],
        privacy: dict[str, PrivacyState],
        shadow_transitions: list[Transition] | None = None,
    ):
        self.engine = engine
        self.privacy = privacy  # the known ids' privacy records: a fold is withheld or buried as an event
        self.retention_ms = engine.config.retention_ms
        self.profiles = profiles
        self.transitions = transitions
        # A candidate in shadow's transitions (docs/deployments.md), when the engine runs one.
        self.shadow_transitions: list[Transition] = [] if shadow_transitions is None else shadow_transitions
        self.aliases: dict[str, Alias] = {}
        self.rejected: Counter = Counter()  # the job's dead-letter reasons for identifies and forwards
        self.erasures: list[Erasure] = []  # the job's audit records, in the order it writes them

    def identify(self, identify: Identify, late_before_ms: int | None = None) -> int:
        """Folds the anonymous id into the known id; 1 when the identify was too late, else 0."""
        anonymous = identify.anonymous_id
        alias = self.aliases.get(anonymous)
        if alias is not None and identify.timestamp < alias.until_ms:
            if alias.known_id != identify.known_id:  # already merged into another user
                self.rejected["identity_conflict"] += 1
            return 0  # a resent identify: the merge is done
        profile = self.profiles.pop(anonymous, None) or UserProfile()
        fold = self.engine.step_fold_out(anonymous, profile, identify, late_before_ms)
        if fold.step.outcome == LATE:
            if not profile.is_empty:
                self.profiles[anonymous] = profile
            return 1
        self.transitions.extend(fold.step.transitions)
        self.shadow_transitions.extend(fold.step.shadow_transitions)
        self.aliases[anonymous] = Alias(identify.known_id, identify.timestamp + self.retention_ms)
        if fold.folded is None:
            return 0
        source, target = anonymous, identify.known_id
        for _ in range(MAX_ALIAS_HOPS + 1):
            alias = self.aliases.get(target)
            if alias is None or identify.timestamp >= alias.until_ms:
                break
            if alias.known_id == source:  # the fold comes back from where this id went: it takes it in
                del self.aliases[target]
                break
            source, target = target, alias.known_id
        else:
            self.rejected["identity_loop"] += 1
            return 0
        known = self.profiles.setdefault(target, UserProfile())
        state = self.privacy.setdefault(target, PrivacyState())
        step = self.engine.step_fold_in(target, known, fold.folded, identify.event_id, state, source)
        self.transitions.extend(step.transitions)
        self.shadow_transitions.extend(step.shadow_transitions)
        if step.drop_state:
            self.profiles.pop(target, None)
        return 0

    def route(self, user_id: str, timestamp: int) -> str | None:
        """The id whose profile counts an event of `user_id` at `timestamp`: its own, or where its
        aliases lead (None: they loop, and the event is a dead letter)."""
        for _ in range(MAX_ALIAS_HOPS + 1):
            alias = self.aliases.get(user_id)
            if alias is None:
                return user_id
            target = forward_target(alias, timestamp, self.retention_ms)
            if target is None:  # the alias has run out: the id is its own again
                del self.aliases[user_id]
                return user_id
            user_id = target
        self.rejected["identity_loop"] += 1
        return None

    def request(self, request: UserRequest, tombstone_ms: int) -> None:
        """Applies a privacy request as the job does (`step_request`, the alias of an erased id
        erased with it), then the erasures it fans out to the ids folded into the user, each
        before the next record of the log, and theirs in turn."""
        pending = deque([request])
        while pending:
            request = pending.popleft()
            user_id = request.user_id
            profile = self.profiles.setdefault(user_id, UserProfile())
            state = self.privacy.setdefault(user_id, PrivacyState())
            step = self.engine.step_request(user_id, profile, state, request, tombstone_ms)
            self.transitions.extend(step.transitions)
            self.shadow_transitions.extend(step.shadow_transitions)
            if step.drop_state:
                self.profiles.pop(user_id, None)
            if step.outcome != ERASED:
                continue
            erased = step.erased
            if self.aliases.pop(user_id, None) is not None:  # its later events are its own again
                erased += (ERASED_ALIAS,)
            self.erasures.append(
                Erasure(request.request_id, user_hash(user_id), request.timestamp, request.source, erased)
            )
            pending.extend(step.fan_out)
