"""The job's identity merge in one process: what the backtest and `replay_events` run for identify
records (docs/architecture.md, "Identity merge across keys").

The job's cross-key protocol reduces to this in a single process: the fold the job sends through
its feedback topic is delivered at once, and the alias it keeps in the anonymous id's keyed state
is a dict entry. Both runners call the same per-user steps as the job (`step_fold_out`,
`step_fold_in`), so their transitions are the job's for a log in which each fold reaches the known
id before that id's next record (the feedback topic's delay is the only difference).
"""

from __future__ import annotations

from collections import Counter

from udfs.identity import MAX_ALIAS_HOPS, Alias, Identify, forward_target
from udfs.privacy import PrivacyState
from udfs.profile import UserProfile
from udfs.transitions import LATE, SegmentEngine, Transition


class IdentityReplay:
    """The aliases the job keeps per anonymous id, and the folds it sends, replayed over the
    runner's own profiles, privacy records and transitions list (all shared, updated in place)."""

    def __init__(
        self,
        engine: SegmentEngine,
        profiles: dict[str, UserProfile],
        transitions: list[Transition],
        privacy: dict[str, PrivacyState],
    ):
        self.engine = engine
        self.privacy = privacy  # the known ids' privacy records: a fold is withheld or buried as an event
        self.retention_ms = engine.config.retention_ms
        self.profiles = profiles
        self.transitions = transitions
        self.aliases: dict[str, Alias] = {}
        self.rejected: Counter = Counter()  # the job's dead-letter reasons for identifies and forwards

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
        step = self.engine.step_fold_in(target, known, fold.folded, identify.event_id, state)
        self.transitions.extend(step.transitions)
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
