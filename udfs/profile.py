"""A user's profile: bounded, event-time state from which every feature is read (see
`udfs/features.py`), updated one accepted event at a time, in any order within the lateness bound.

Everything here is commutative in the events, except the cart, whose operations are kept in
event-time order per line (a few per line) so an out-of-order purchase or removal lands where it
happened. Sizes are bounded by `ProfileConfig`, not by the number of events.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field, fields

from udfs.context import DIRECT, device_class
from udfs.events import EVENT_TYPES, UserEvent
from udfs.profile_config import MINUTE_MS, WEEK_MS, ProfileConfig

# Bucket counts are a list in this order (UserEvent's EventType symbols; new types are appended).
EVENT_INDEX = {kind: i for i, kind in enumerate(EVENT_TYPES)}

# The events that change the cart (a purchase empties it).
CART_CHANGING_TYPES = frozenset(("add_to_cart", "remove_from_cart", "purchase"))

# Cart operation kinds; SET is what the oldest operations of a long line are folded into.
ADD, REMOVE, REMOVE_ALL, SET = "ADD", "REMOVE", "REMOVE_ALL", "SET"


@dataclass(slots=True)
class Bucket:
    """One bucket of a horizon: event counts by type, spend and product views by category."""

    counts: list[int] = field(default_factory=lambda: [0] * len(EVENT_TYPES))  # by EVENT_INDEX
    spend: float = 0.0
    category_views: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Session:
    """A session: its first and last event time and how many events it had."""

    start_ms: int
    end_ms: int
    events: int


@dataclass(slots=True)
class CartOp:
    """One change to a cart line (add, remove, remove all, set), kept so out-of-order events fold in time order."""

    time_ms: int
    kind: str
    quantity: int
    unit_price: float | None


@dataclass(slots=True)
class CartLine:
    """A cart line as its operations fold: quantity and unit price."""

    quantity: int
    unit_price: float


@dataclass(slots=True)
class Membership:
    """A user's membership of one segment: whether a member, the last transition's sequence, since when."""

    member: bool
    sequence: int
    since_ms: int


@dataclass(slots=True)
class ShadowState:
    """A candidate deployed in shadow (udfs/deployments.py), on this profile: its own memberships,
    scores and clock beside the active version's, kept in state so they survive restarts."""

    deployment: str  # the id of the control record that started the shadow
    clock_ms: int
    memberships: dict[str, Membership] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    scored_at_ms: int | None = None


# The key in `UserProfile.derived` of the state codec's encoded body (all of the state but the
# clock and the pending timer; udfs/state.py): kept until the state changes, so a step that moved
# only those two does not encode the rest again.
ENCODED_BODY = "encoded_body"


@dataclass(slots=True)
class UserProfile:
    """The user's bounded profile: everything the features read, kept in Flink state between events."""

    clock_ms: int = 0
    # Transition sequences of this lifetime start above this, so a user who comes back after the
    # profile was dropped never reuses a (user, segment, sequence) and hence a transition id.
    sequence_base: int = 0
    last_by_type: dict[str, int] = field(default_factory=dict)
    buckets: dict[int, dict[int, Bucket]] = field(default_factory=dict)  # width -> start -> bucket
    lifetime_spend: float = 0.0
    lifetime_orders: int = 0
    products_viewed: dict[str, int] = field(default_factory=dict)  # latest view time
    categories_viewed: dict[str, int] = field(default_factory=dict)
    named_sessions: dict[str, Session] = field(default_factory=dict)
    derived_sessions: list[Session] = field(default_factory=list)  # by start, > gap apart
    cart_ops: dict[str, list[CartOp]] = field(default_factory=dict)  # by (time, arrival)
    cart_cleared_ms: int | None = None  # latest purchase
    decay_as_of_ms: int = 0
    engagement: float = 0.0  # as of decay_as_of_ms
    affinity: dict[str, float] = field(default_factory=dict)  # as of decay_as_of_ms
    seen_event_ids: dict[int, int] = field(default_factory=dict)  # id hash -> event time, arrival order
    memberships: dict[str, Membership] = field(default_factory=dict)
    timer_ms: int | None = None
    scores: dict[str, float] = field(default_factory=dict)  # model scores as of scored_at_ms
    scored_at_ms: int | None = None  # the latest accepted event, or the latest rescoring timer
    # Context (docs/features.md): "device", "country", "timezone", "referrer" -> (time, value) of
    # the latest event that carried one (on a tie the greater value, so arrival order never matters).
    context: dict[str, tuple[int, str]] = field(default_factory=dict)
    # The latest event with a campaign value: (time, utm_source, utm_medium, utm_campaign), "" for
    # one it did not carry; ties as above.
    touch: tuple[int, str, str, str] | None = None
    # The lifetime's earliest event: (time, its source: utm_source, else referrer host, else
    # "direct"); on a tie the lesser source.
    first_seen: tuple[int, str] | None = None
    # The latest live deployment applied to the profile (udfs/deployments.py): the id of its
    # control record; None: the definitions the job started with.
    deployment: str | None = None
    shadow: ShadowState | None = None  # the candidate in shadow, when one runs
    # Not state: when `prune` last ran on this object (a restored profile is pruned on first use).
    pruned_at_ms: int = field(default=-(2**62), compare=False, repr=False)
    # Not state: (engine, clock_ms, instant) of an engine's latest `next_change_ms` answer for
    # this object, cleared by every engine call that changes it (see SegmentEngine.next_change_ms).
    next_change_memo: tuple | None = field(default=None, compare=False, repr=False)
    # Not state: values derived from the state (the folded cart, the sessions, a horizon's
    # totals), computed once and kept until the state changes: `apply_event` and `prune` clear
    # it. Several features read each of them at every evaluation instant.
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    def body_changed(self) -> None:
        """Memberships or scores changed: the encoded body no longer holds (`apply_event` and
        `prune`, which change the rest, clear every derived value)."""
        self.derived.pop(ENCODED_BODY, None)

    def reset(self) -> None:
        """Back to an empty profile (the retention ran out), in place: callers hold this object."""
        empty = UserProfile()
        for f in fields(self):
            setattr(self, f.name, getattr(empty, f.name))

    @property
    def last_event_ms(self) -> int | None:
        """The time of the user's latest event of any type, or None before the first."""
        return max(self.last_by_type.values()) if self.last_by_type else None

    @property
    def is_empty(self) -> bool:
        """True when the profile holds nothing worth keeping (no events, no memberships)."""
        return not self.last_by_type and not self.memberships

    def last_of(self, types) -> int | None:
        """The time of the latest event of any of these types, or None."""
        times = [t for k in types if (t := self.last_by_type.get(k)) is not None]
        return max(times) if times else None

    def cart(self) -> dict[str, CartLine]:
        """The cart's lines now (read only: the result is shared until the state changes)."""
        out = self.derived.get("cart")
        if out is None:
            out = self.derived["cart"] = {}
            for product, ops in self.cart_ops.items():
                line = fold_cart_ops(ops)
                if line is not None:
                    out[product] = line
        return out

    @property
    def cart_value(self) -> float:
        """The cart's value: quantity times unit price, over its lines."""
        return sum(line.quantity * line.unit_price for line in self.cart().values())

    @property
    def cart_items(self) -> int:
        """The number of items in the cart."""
        return sum(line.quantity for line in self.cart().values())


def event_id_hash(event_id: str) -> int:
    """64 bits of BLAKE2b, signed (Avro long): what the dedup memory keeps instead of the id."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "big", signed=True)


def is_duplicate(profile: UserProfile, event: UserEvent, config: ProfileConfig) -> bool:
    """The window is measured back from the latest accepted event, not from the clock: timers
    move the clock as the watermark allows, and a resend must not count or not depending on
    when the watermark happened to fire them. Only within a lifetime: an event at or after
    `last + retention` starts a new one whatever its id (and whether or not the retention timer
    has fired yet, so the job and the backtest agree)."""
    seen_at = profile.seen_event_ids.get(event_id_hash(event.event_id))
    if seen_at is None:
        return False
    last = profile.last_event_ms
    if last is None:  # no event yet, so none seen: cannot happen with an id seen, but says so to the types
        return False
    return seen_at > last - config.dedup_window_ms and event.timestamp < last + config.retention_ms


def decay(value: float, elapsed_ms: int, half_life_ms: int) -> float:
    """The value decayed exponentially over `elapsed_ms` with the given half-life."""
    return value * 2.0 ** (-elapsed_ms / half_life_ms) if elapsed_ms else value


def apply_event(profile: UserProfile, event: UserEvent, config: ProfileConfig) -> None:
    """Adds an accepted (not duplicate) event. The clock is the caller's: it is already at least
    the event's time, or the event is out of order and the clock stays."""
    ts, kind = event.timestamp, event.event_type
    derived = profile.derived
    # The horizons' window totals (udfs/features.py, keyed by a tuple) follow the event below
    # instead of being summed again; the cart stands unless the event is a cart event; the rest
    # (sessions, the encoded body) changes with every event.
    windows = [(key, totals) for key, totals in derived.items() if key.__class__ is tuple]
    cart = derived.get("cart") if kind not in CART_CHANGING_TYPES else None
    derived.clear()
    if cart is not None:
        derived["cart"] = cart
    if not profile.last_by_type:
        profile.sequence_base = max(profile.sequence_base, ts * 1000)
    profile.seen_event_ids[event_id_hash(event.event_id)] = ts
    if len(profile.seen_event_ids) > config.max_seen_event_ids:
        del profile.seen_event_ids[next(iter(profile.seen_event_ids))]
    if ts > profile.last_by_type.get(kind, -1):
        profile.last_by_type[kind] = ts

    index = EVENT_INDEX[kind]
    touched = {}  # bucket width -> (the event's bucket start, the bucket, whether it is new)
    for width in _bucket_widths(config):
        ring = profile.buckets.setdefault(width, {})
        start = ts - ts % width
        bucket = ring.get(start)
        created = bucket is None
        if bucket is None:
            bucket = ring[start] = Bucket()
        touched[width] = (start, bucket, created)
        bucket.counts[index] += 1
        if kind == "purchase":
            bucket.spend += event.price or 0.0
        elif kind == "product_view" and event.category is not None:
            views = bucket.category_views
            views[event.category] = views.get(event.category, 0) + 1
            if len(views) > config.max_bucket_categories:
                del views[min(views, key=lambda c: (views[c], c))]

    for key, totals in windows:
        totals.follow(kind, index, event.category, *touched[totals.width])
        derived[key] = totals

    if kind == "purchase":
        profile.lifetime_spend += event.price or 0.0
        profile.lifetime_orders += 1
    if kind == "product_view":
        if event.product_id is not None:
            _remember_latest(profile.products_viewed, event.product_id, ts, config.max_tracked_items)
        if event.category is not None:
            _remember_latest(profile.categories_viewed, event.category, ts, config.max_tracked_items)

    _add_to_session(profile, event, config)
    _apply_to_cart(profile, event, config)
    _add_decayed_interest(profile, event, config)
    _note_context(profile, event)


# Every 10 minutes of event time: once a minute, an active user's profile was scanned at most
# steps (~6% of the core's time); a state holds at most 10 minutes more of what no feature sees
# (the mean state after a generated week is the same).
PRUNE_EVERY_MS = 10 * MINUTE_MS


def prune(profile: UserProfile, config: ProfileConfig) -> None:
    """Forgets what no feature can see any more at the profile's clock, at most once every
    PRUNE_EVERY_MS of event time (it scans the whole profile). Features check coverage when read
    and session lookups check visibility, so when pruning runs never changes a result; it bounds
    the size."""
    now = profile.clock_ms
    if now - profile.pruned_at_ms < PRUNE_EVERY_MS:
        return
    profile.pruned_at_ms = now
    horizons = config.horizons
    forgotten = False  # the derived values (and the encoded body) hold until something is
    # A time is covered by some horizon iff it is at or after the earliest first-covered instant.
    for width, ring in profile.buckets.items():
        cutoff = min(h.first_covered_ms(now) for h in horizons if h.bucket_ms == width)
        for start in [s for s in ring if s < cutoff]:
            del ring[start]
            forgotten = True
    cutoff = min(h.first_covered_ms(now) for h in horizons)
    for tracked in (profile.products_viewed, profile.categories_viewed):
        for item in [k for k, t in tracked.items() if t < cutoff]:
            del tracked[item]
            forgotten = True
    # _session_visible with the horizons' test taken out once: covered by some horizon = at or
    # after `cutoff`.
    gap_start, week_start = now - config.session_gap_ms, now - WEEK_MS
    for sid in [
        k
        for k, s in profile.named_sessions.items()
        if not (s.end_ms > gap_start or s.end_ms > week_start or s.end_ms >= cutoff)
    ]:
        del profile.named_sessions[sid]
        forgotten = True
    if profile.derived_sessions:
        kept = [
            s for s in profile.derived_sessions if s.end_ms > gap_start or s.end_ms > week_start or s.end_ms >= cutoff
        ]
        if len(kept) != len(profile.derived_sessions):
            profile.derived_sessions = kept
            forgotten = True
    last = profile.last_event_ms  # None exactly when there is no event (last_by_type empty)
    if last is not None:
        horizon = last - config.dedup_window_ms
        for key in [k for k, t in profile.seen_event_ids.items() if t <= horizon]:
            del profile.seen_event_ids[key]
            forgotten = True
    if forgotten:
        profile.derived.clear()


def _session_visible(session: Session, now: int, config: ProfileConfig) -> bool:
    end = session.end_ms
    return now - end < config.session_gap_ms or end > now - WEEK_MS or any(h.covers(end, now) for h in config.horizons)


def _bucket_widths(config: ProfileConfig) -> list[int]:
    return sorted({h.bucket_ms for h in config.horizons})


def _remember_latest(tracked: dict[str, int], key: str, ts: int, cap: int) -> None:
    if ts > tracked.get(key, -1):
        tracked[key] = ts
    if len(tracked) > cap:
        del tracked[min(tracked, key=lambda k: (tracked[k], k))]


def _add_to_session(profile: UserProfile, event: UserEvent, config: ProfileConfig) -> None:
    ts = event.timestamp
    cap = config.max_tracked_items
    if event.session_id is not None:
        session = profile.named_sessions.get(event.session_id)
        if session is None or not _session_visible(session, profile.clock_ms, config):  # forgotten: a new one
            profile.named_sessions[event.session_id] = Session(ts, ts, 1)
            if len(profile.named_sessions) > cap:
                named = profile.named_sessions
                del named[min(named, key=lambda k: (named[k].end_ms, k))]
        else:
            session.start_ms = min(session.start_ms, ts)
            session.end_ms = max(session.end_ms, ts)
            session.events += 1
        return
    # Derived sessions: the event joins every run it is within the gap of (at most one on each
    # side, since runs are more than the gap apart), which may bridge two runs into one.
    gap = config.session_gap_ms
    joined = Session(ts, ts, 1)
    kept = []
    for s in profile.derived_sessions:
        if s.start_ms - gap <= ts <= s.end_ms + gap and _session_visible(s, profile.clock_ms, config):
            joined = Session(min(joined.start_ms, s.start_ms), max(joined.end_ms, s.end_ms), joined.events + s.events)
        else:
            kept.append(s)
    bisect.insort(kept, joined, key=lambda s: s.start_ms)
    if len(kept) > cap:
        kept.pop(0)
    profile.derived_sessions = kept


def _apply_to_cart(profile: UserProfile, event: UserEvent, config: ProfileConfig) -> None:
    ts, kind = event.timestamp, event.event_type
    if kind == "purchase":
        # Empties the cart as of its time: operations up to it (including those at the same
        # instant, which arrived before it) are gone; later ones stay.
        if profile.cart_cleared_ms is None or ts > profile.cart_cleared_ms:
            profile.cart_cleared_ms = ts
        for product in list(profile.cart_ops):
            ops = [op for op in profile.cart_ops[product] if op.time_ms > ts]
            if ops:
                profile.cart_ops[product] = ops
            else:
                del profile.cart_ops[product]
        return
    if kind not in ("add_to_cart", "remove_from_cart"):
        return
    if profile.cart_cleared_ms is not None and ts < profile.cart_cleared_ms:
        return  # happened before a purchase that emptied the cart
    if kind == "add_to_cart":
        op = CartOp(ts, ADD, event.quantity or 1, event.price)
    elif event.quantity is None:
        op = CartOp(ts, REMOVE_ALL, 0, None)
    else:
        op = CartOp(ts, REMOVE, event.quantity, None)
    assert event.product_id is not None  # validated: every cart event has one (udfs/events.py)
    ops = profile.cart_ops.setdefault(event.product_id, [])
    bisect.insort_right(ops, op, key=lambda o: o.time_ms)  # after same-time ops: arrival order
    if len(ops) > config.max_cart_ops_per_line:
        folded = ops[: len(ops) - config.max_cart_ops_per_line + 1]
        line = fold_cart_ops(folded)
        base = CartOp(folded[-1].time_ms, SET, line.quantity if line else 0, line.unit_price if line else None)
        ops[: len(folded)] = [base]
    if len(profile.cart_ops) > config.max_cart_lines:
        _evict_cart_line(profile)


def _evict_cart_line(profile: UserProfile) -> None:
    """Over the line cap: forget an emptied line first, else the line touched longest ago."""

    def age(product: str):
        ops = profile.cart_ops[product]
        return (fold_cart_ops(ops) is not None, ops[-1].time_ms, product)

    del profile.cart_ops[min(profile.cart_ops, key=age)]


def fold_cart_ops(ops: list[CartOp]) -> CartLine | None:
    """The cart line these operations (sorted by time) leave; None when they leave none."""
    line: CartLine | None = None
    for op in ops:
        if op.kind == ADD:
            if line is None:
                line = CartLine(0, 0.0)
            line.quantity += op.quantity
            if op.unit_price is not None:
                line.unit_price = op.unit_price
        elif op.kind == REMOVE:
            if line is not None:
                line.quantity -= op.quantity
                if line.quantity <= 0:
                    line = None
        elif op.kind == REMOVE_ALL:
            line = None
        else:  # SET
            line = CartLine(op.quantity, op.unit_price or 0.0) if op.quantity > 0 else None
    return line


def _add_decayed_interest(profile: UserProfile, event: UserEvent, config: ProfileConfig) -> None:
    """Scores are kept as of `decay_as_of_ms` (the latest event time); an older event is added
    already decayed to that instant, a newer one first moves the reference forward."""
    ts = event.timestamp
    if ts > profile.decay_as_of_ms:
        elapsed = ts - profile.decay_as_of_ms
        profile.engagement = decay(profile.engagement, elapsed, config.engagement_half_life_ms)
        for category, value in profile.affinity.items():
            profile.affinity[category] = decay(value, elapsed, config.affinity_half_life_ms)
        profile.decay_as_of_ms = ts
    age = profile.decay_as_of_ms - ts
    weight = config.engagement_weights.get(event.event_type, 0.0)
    if weight:
        profile.engagement += decay(weight, age, config.engagement_half_life_ms)
    weight = config.affinity_weights.get(event.event_type, 0.0)
    if weight and event.category is not None:
        affinity = profile.affinity
        affinity[event.category] = affinity.get(event.category, 0.0) + decay(weight, age, config.affinity_half_life_ms)
        if len(affinity) > config.max_tracked_items:
            del affinity[min(affinity, key=lambda k: (affinity[k], k))]


def _note_context(profile: UserProfile, event: UserEvent) -> None:
    """Keeps the context the event carries where it is the latest (or, for first_seen, the
    earliest) by event time; the values are already bounded (udfs/context.py)."""
    ts = event.timestamp
    first = profile.first_seen
    if first is None or ts <= first[0]:
        source = event.utm_source or event.referrer or DIRECT
        if first is None or ts < first[0] or source < first[1]:
            profile.first_seen = (ts, source)
    context = profile.context
    if event.device is not None:
        device = device_class(event.device)
        if device is not None:
            _keep_latest(context, "device", ts, device)
    if event.country is not None:
        _keep_latest(context, "country", ts, event.country)
    if event.timezone is not None:
        _keep_latest(context, "timezone", ts, event.timezone)
    if event.referrer is not None:
        _keep_latest(context, "referrer", ts, event.referrer)
    if event.utm_source is not None or event.utm_medium is not None or event.utm_campaign is not None:
        touch = (ts, event.utm_source or "", event.utm_medium or "", event.utm_campaign or "")
        if profile.touch is None or touch > profile.touch:
            profile.touch = touch


def _keep_latest(context: dict[str, tuple[int, str]], kind: str, ts: int, value: str) -> None:
    held = context.get(kind)
    if held is None or ts > held[0] or (ts == held[0] and value > held[1]):
        context[kind] = (ts, value)
