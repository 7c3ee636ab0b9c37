"""The profile's features by name: one reader per feature, resolved once from the configuration,
and for features that step as time passes (windowed counts, sessions), when they next change
with no new event, which is where the engine sets its timer. docs/features.md is the
specification; `tests/unit/profile_oracle.py` recomputes it from raw event logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from udfs.context import DAY_S, DEVICE_CLASSES, HOUR_S, WEEKDAYS, local_hour, local_weekday, next_boundary_ms
from udfs.events import CART_EVENT_TYPES, EVENT_TYPES
from udfs.profile import CART_CHANGING_TYPES, EVENT_INDEX, WEEK_MS, Bucket, Session, UserProfile, decay
from udfs.profile_config import Horizon, ProfileConfig

Reader = Callable[[UserProfile, int], Any]
Lapse = Callable[[UserProfile, int], "int | None"]

CART_ACTIVITY_TYPES = (*sorted(CART_EVENT_TYPES), "checkout_start", "purchase")

# What a feature's value is, for the definitions compiler's type checks.
NUMBER, DURATION, TEXT, TEXT_LIST, MAP = "number", "duration", "text", "text list", "map"
# How a value moves while no event arrives: not at all but at its lapses (STEP), up by one per
# millisecond (RECENCY: "ms since"), or halving every half-life (DECAY).
STEP, RECENCY, DECAY = "step", "recency", "decay"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """What a feature is: its type, whether it changes with time alone, whether it can be missing, its values."""

    kind: str  # NUMBER | DURATION | TEXT | TEXT_LIST | MAP
    motion: str = STEP
    nullable: bool = False  # None when there is nothing to measure (e.g. no such event yet)
    choices: tuple[str, ...] = ()  # TEXT: every value it can take
    value_kind: str = NUMBER  # MAP: the kind of its values
    missing_key: float | None = 0.0  # MAP: the value of a key it does not hold
    half_life_ms: int = 0  # DECAY
    # A STEP value that never rises while no event comes (windowed counts: events only leave the
    # window): a comparison it cannot flip by falling needs no timer.
    falls_only: bool = False
    # The event types whose application can change the value or its course in time (None: any
    # type). What lets a step re-decide only the segments an event can reach (udfs/definitions.py):
    # a feature outside the set follows the same course in time after such an event as before it.
    # Conservative on purpose: a type listed that cannot change the value costs a re-decision.
    changed_by: frozenset[str] | None = None


def _since(p: UserProfile, now: int, types: Iterable[str]) -> int | None:
    last = p.last_of(types)
    return None if last is None else now - last


def _earliest(times: Iterable[int]) -> int | None:
    return min(times, default=None)


def _sessions(p: UserProfile) -> list[tuple[Session, str | None]]:
    sessions = p.derived.get("sessions")
    if sessions is None:
        sessions = p.derived["sessions"] = [(s, sid) for sid, s in p.named_sessions.items()] + [
            (s, None) for s in p.derived_sessions
        ]
    return sessions


def current_session(p: UserProfile, now: int, gap_ms: int) -> Session | None:
    """The session with the latest last event, if that event is less than the gap ago; on a tie
    a named session beats a derived one, then the greatest session id."""
    derived = p.derived
    if "latest_session" in derived:
        session = derived["latest_session"]
    else:
        sessions = _sessions(p)
        session = derived["latest_session"] = (
            max(sessions, key=lambda e: (e[0].end_ms, e[1] is not None, e[1] or ""))[0] if sessions else None
        )
    return session if session is not None and now - session.end_ms < gap_ms else None


def _this_week(p: UserProfile, t: int) -> list[Session]:
    """Sessions whose last event is less than a week before `t`."""
    got = p.derived.get("week")
    if got is None or got[0] != t:
        since = t - WEEK_MS
        got = p.derived["week"] = (
            t,
            [s for s in (*p.named_sessions.values(), *p.derived_sessions) if s.end_ms > since],
        )
    return got[1]


class WindowTotals:
    """One horizon's view of the profile at one first-covered instant: the buckets, views and
    sessions it covers and their totals, each computed on first use. Kept in `profile.derived`
    (one per horizon), so the ~20 windowed features an evaluation reads cost one pass each."""

    __slots__ = (
        "first",
        "width",
        "length",
        "buckets",
        "_counts",
        "_spend",
        "_categories",
        "_lapse",
        "_products",
        "_categories_seen",
        "_sessions",
    )
    first: int
    width: int
    length: int
    buckets: list[Bucket]
    _lapse: int | None
    # Each computed on first use (None: not yet, or to be computed again).
    _counts: dict[int | None, int] | None  # by event index, None: every type
    _spend: float | None
    _categories: dict[str, int] | None
    _products: list[int] | None  # the last-viewed instants of the products seen within the window
    _categories_seen: list[int] | None
    _sessions: list[Session] | None

    def __init__(self, first: int, h: Horizon, buckets: list[Bucket], lapse: int | None):
        self.first = first  # the earliest covered instant
        self.width, self.length = h.bucket_ms, h.length_ms
        self.buckets = buckets  # covered, in the ring's order (float sums in the same order as ever)
        self._lapse = lapse  # when the earliest covered bucket stops counting
        self._counts = self._spend = self._categories = None
        self._products = self._categories_seen = self._sessions = None

    def follow(self, kind: str, index: int, category: str | None, start: int, bucket: Bucket, created: bool) -> None:
        """Brings the totals past an event just added to `bucket` (starting at `start`; `created`
        for it), to what a fresh build at the same first covered instant would give: a new
        bucket is the last of its ring, so it is appended; the counts read so far move by one;
        spend, category views, the products and categories seen and the sessions are left to be
        computed again on their next read (a float sum in the ring's order, as ever)."""
        if start >= self.first:
            if created:
                self.buckets.append(bucket)
                lapse = start + self.length
                if self._lapse is None or lapse < self._lapse:
                    self._lapse = lapse
            counts = self._counts
            if counts is not None:
                if index in counts:
                    counts[index] += 1
                if None in counts:
                    counts[None] += 1
            if kind == "purchase":
                self._spend = None
            elif kind == "product_view" and category is not None:
                self._categories = None
        if kind == "product_view":
            self._products = self._categories_seen = None
        self._sessions = None

    def count(self, index: int | None) -> int:
        """Events of the type at `index` (None: of every type) in the covered buckets."""
        counts = self._counts
        if counts is None:
            counts = self._counts = {}
        total = counts.get(index)
        if total is None:
            if index is None:
                total = counts[index] = sum(map(sum, [b.counts for b in self.buckets]))
            else:
                total = counts[index] = sum([b.counts[index] for b in self.buckets])
        return total

    def spend(self) -> float:
        """The purchases' total within the window."""
        if self._spend is None:
            self._spend = sum(b.spend for b in self.buckets)
        return self._spend

    def category_views(self) -> dict[str, int]:
        """Product views by category within the window."""
        if self._categories is None:
            out: dict[str, int] = {}
            for b in self.buckets:
                for category, views in b.category_views.items():
                    out[category] = out.get(category, 0) + views
            self._categories = out
        return self._categories


def _window_of(h: Horizon) -> Callable[[UserProfile, int], WindowTotals]:
    """`window(p, now)`: the horizon's WindowTotals at `now`, from `p.derived` while the state and
    the first covered instant are the same (read ~20 times per evaluation: kept lean)."""
    width, length, slot = h.bucket_ms, h.length_ms, ("window", h.name)

    def window(p: UserProfile, now: int) -> WindowTotals:
        first = now - now % width - length + width  # h.first_covered_ms(now)
        totals = p.derived.get(slot)
        if totals is None or totals.first != first:
            ring = p.buckets.get(width)
            if ring:
                starts = [start for start in ring if start >= first]  # starts are bucket starts
                totals = WindowTotals(
                    first, h, [ring[start] for start in starts], min(starts) + length if starts else None
                )
            else:
                totals = WindowTotals(first, h, [], None)
            p.derived[slot] = totals
        return totals

    return window


class FeatureCatalog:
    """Every feature of the table in docs/features.md, for one configuration."""

    def __init__(self, config: ProfileConfig):
        self.config = config
        self.readers: dict[str, Reader] = {}
        self.lapses: dict[str, Lapse] = {}
        self.specs: dict[str, FeatureSpec] = {}
        # Map features read for one key, without building the whole map (conditions name keys).
        self.key_readers: dict[str, Callable[[UserProfile, int, str], Any]] = {}
        self.key_lapses: dict[str, Callable[[UserProfile, int, str], int | None]] = {}
        self._recency()
        for h in config.horizons:
            self._windowed(h)
        self._lifetime_and_cart()
        self._sessions()
        self._interest()
        self._context()
        if set(self.specs) != set(self.readers):
            raise AssertionError(f"features without a spec: {sorted(set(self.readers) ^ set(self.specs))}")

    @property
    def names(self) -> tuple[str, ...]:
        """Every feature's name."""
        return tuple(self.readers)

    def read(self, name: str, profile: UserProfile, now_ms: int) -> Any:
        """One feature of the profile at `now_ms`."""
        return self.readers[name](profile, now_ms)

    def next_change_ms(self, name: str, profile: UserProfile, now_ms: int) -> int | None:
        """When a step feature next changes with no new event (None: never, or it is continuous,
        like recency and decayed scores, whose threshold crossings the condition works out)."""
        lapse = self.lapses.get(name)
        return lapse(profile, now_ms) if lapse else None

    def all(self, profile: UserProfile, now_ms: int) -> dict[str, Any]:
        """Every feature of the profile at `now_ms`, by name."""
        return {name: read(profile, now_ms) for name, read in self.readers.items()}

    # -- families -----------------------------------------------------------------------------

    def _recency(self) -> None:
        r = self.readers
        r["ms_since_last_event"] = lambda p, t: _since(p, t, p.last_by_type)
        for kind in EVENT_TYPES:

            def since_last(p: UserProfile, t: int, k: tuple[str, ...] = (kind,)) -> int | None:
                return _since(p, t, k)

            r[f"ms_since_last_{kind}"] = since_last
        r["ms_since_cart_activity"] = lambda p, t: _since(p, t, CART_ACTIVITY_TYPES)
        r["ms_since_cart_change"] = lambda p, t: _since(p, t, CART_EVENT_TYPES)
        changed_by = {f"ms_since_last_{kind}": frozenset((kind,)) for kind in EVENT_TYPES}
        changed_by["ms_since_cart_activity"] = frozenset(CART_ACTIVITY_TYPES)
        changed_by["ms_since_cart_change"] = frozenset(CART_EVENT_TYPES)
        for name in r:
            self.specs[name] = FeatureSpec(DURATION, RECENCY, nullable=True, changed_by=changed_by.get(name))

    def _windowed(self, h: Horizon) -> None:
        r, lapses, n = self.readers, self.lapses, h.name
        _window = _window_of(h)

        def bucket_lapse(p: UserProfile, now: int) -> int | None:
            return _window(p, now)._lapse

        def count(kinds):
            index = None if len(kinds) == len(EVENT_TYPES) else EVENT_INDEX[kinds[0]]
            return lambda p, t: _window(p, t).count(index)

        def spend(p, t):
            return _window(p, t).spend()

        purchases = EVENT_INDEX["purchase"]

        def aov(p, t):
            totals = _window(p, t)
            orders = totals.count(purchases)
            return totals.spend() / orders if orders else None

        def category_views(p, t):
            return dict(_window(p, t).category_views())

        def latest_covered(attribute: str):
            def covered(p: UserProfile, t: int) -> list[int]:
                totals = _window(p, t)
                got = getattr(totals, attribute)
                if got is None:
                    tracked = p.products_viewed if attribute == "_products" else p.categories_viewed
                    first = totals.first
                    got = [v for v in tracked.values() if v >= first]
                    setattr(totals, attribute, got)
                return got

            return covered

        def distinct(covered):
            return lambda p, t: len(covered(p, t))

        def distinct_lapse(covered):
            return lambda p, t: _earliest(h.lapses_at(v) for v in covered(p, t))

        def sessions_covered(p, t):
            totals = _window(p, t)
            if totals._sessions is None:
                first = totals.first
                totals._sessions = [s for s in (*p.named_sessions.values(), *p.derived_sessions) if s.end_ms >= first]
            return totals._sessions

        before = set(r)
        r[f"events_{n}"] = count(EVENT_TYPES)
        for kind in EVENT_TYPES:
            r[f"count_{kind}_{n}"] = count((kind,))
        r[f"sessions_{n}"] = lambda p, t: len(sessions_covered(p, t))
        lapses[f"sessions_{n}"] = lambda p, t: _earliest(h.lapses_at(s.end_ms) for s in sessions_covered(p, t))
        products, categories = latest_covered("_products"), latest_covered("_categories_seen")
        r[f"distinct_products_viewed_{n}"] = distinct(products)
        lapses[f"distinct_products_viewed_{n}"] = distinct_lapse(products)
        r[f"distinct_categories_viewed_{n}"] = distinct(categories)
        lapses[f"distinct_categories_viewed_{n}"] = distinct_lapse(categories)
        r[f"category_views_{n}"] = category_views
        self.key_readers[f"category_views_{n}"] = lambda p, t, key: _window(p, t).category_views().get(key, 0)
        r[f"spend_{n}"] = spend
        r[f"orders_{n}"] = count(("purchase",))
        r[f"aov_{n}"] = aov
        for name in set(r) - before - set(lapses):
            lapses[name] = bucket_lapse
        viewed, purchased = frozenset(("product_view",)), frozenset(("purchase",))
        changed_by: dict[str, frozenset[str] | None] = {f"count_{kind}_{n}": frozenset((kind,)) for kind in EVENT_TYPES}
        for name in (f"distinct_products_viewed_{n}", f"distinct_categories_viewed_{n}", f"category_views_{n}"):
            changed_by[name] = viewed
        for name in (f"spend_{n}", f"orders_{n}", f"aov_{n}"):
            changed_by[name] = purchased
        for name in set(r) - before:  # counts of what is still in the window
            self.specs[name] = FeatureSpec(NUMBER, falls_only=True, changed_by=changed_by.get(name))
        # a float sum: no order argument made for it
        self.specs[f"spend_{n}"] = FeatureSpec(NUMBER, changed_by=purchased)
        self.specs[f"aov_{n}"] = FeatureSpec(NUMBER, nullable=True, changed_by=purchased)
        self.specs[f"category_views_{n}"] = FeatureSpec(MAP, falls_only=True, changed_by=viewed)

    def _lifetime_and_cart(self) -> None:
        r = self.readers
        r["lifetime_spend"] = lambda p, t: p.lifetime_spend
        r["lifetime_orders"] = lambda p, t: p.lifetime_orders
        r["lifetime_aov"] = lambda p, t: p.lifetime_spend / p.lifetime_orders if p.lifetime_orders else None
        r["cart"] = lambda p, t: {k: (line.quantity, line.unit_price) for k, line in p.cart().items()}
        r["cart_lines"] = lambda p, t: len(p.cart())
        r["cart_items"] = lambda p, t: p.cart_items
        r["cart_value"] = lambda p, t: p.cart_value

        def checkout_pending(p, t):
            checkout, purchase = p.last_by_type.get("checkout_start"), p.last_by_type.get("purchase")
            return 1 if checkout is not None and (purchase is None or checkout > purchase) else 0

        r["checkout_pending"] = checkout_pending
        r["cart_quantity"] = lambda p, t: {k: line.quantity for k, line in p.cart().items()}
        self.key_readers["cart_quantity"] = lambda p, t, key: line.quantity if (line := p.cart().get(key)) else 0
        purchased, cart = frozenset(("purchase",)), frozenset(CART_CHANGING_TYPES)
        for name in ("lifetime_spend", "lifetime_orders"):
            self.specs[name] = FeatureSpec(NUMBER, changed_by=purchased)
        for name in ("cart_lines", "cart_items", "cart_value"):
            self.specs[name] = FeatureSpec(NUMBER, changed_by=cart)
        self.specs["checkout_pending"] = FeatureSpec(NUMBER, changed_by=frozenset(("checkout_start", "purchase")))
        self.specs["lifetime_aov"] = FeatureSpec(NUMBER, nullable=True, changed_by=purchased)
        self.specs["cart_quantity"] = FeatureSpec(MAP, changed_by=cart)
        # not for conditions
        self.specs["cart"] = FeatureSpec(MAP, value_kind="quantity and unit price", changed_by=cart)

    def _sessions(self) -> None:
        r, lapses, gap = self.readers, self.lapses, self.config.session_gap_ms

        def current(attribute):
            def read(p, t):
                s = current_session(p, t, gap)
                return None if s is None else attribute(s)

            return read

        def session_lapse(p, t):
            s = current_session(p, t, gap)
            return None if s is None else s.end_ms + gap

        r["sessions_per_week"] = lambda p, t: len(_this_week(p, t))
        lapses["sessions_per_week"] = lambda p, t: _earliest(s.end_ms + WEEK_MS for s in _this_week(p, t))
        r["in_session"] = lambda p, t: 0 if current_session(p, t, gap) is None else 1
        r["current_session_start_ms"] = current(lambda s: s.start_ms)
        r["current_session_events"] = current(lambda s: s.events)
        r["current_session_duration_ms"] = current(lambda s: s.end_ms - s.start_ms)
        for name in ("in_session", "current_session_start_ms", "current_session_events", "current_session_duration_ms"):
            lapses[name] = session_lapse
        self.specs["sessions_per_week"] = FeatureSpec(NUMBER, falls_only=True)
        self.specs["in_session"] = FeatureSpec(NUMBER)
        self.specs["current_session_start_ms"] = FeatureSpec(NUMBER, nullable=True)  # epoch ms
        self.specs["current_session_events"] = FeatureSpec(NUMBER, nullable=True)
        self.specs["current_session_duration_ms"] = FeatureSpec(DURATION, nullable=True)

    def _interest(self) -> None:
        r, lapses, config = self.readers, self.lapses, self.config

        def engagement(p, t):
            return decay(p.engagement, t - p.decay_as_of_ms, config.engagement_half_life_ms)

        def affinity(p, t):
            elapsed = t - p.decay_as_of_ms
            return {c: decay(v, elapsed, config.affinity_half_life_ms) for c, v in p.affinity.items()}

        def top_categories(p, t):
            ranked = sorted(p.affinity.items(), key=lambda e: (-e[1], e[0]))  # decay keeps the order
            return [c for c, _ in ranked[: config.affinity_top_k]]

        basis = r["sessions_per_week"] if config.tier_basis == "sessions_per_week" else engagement

        def tier_of(value: float) -> str:
            if value > config.tier_high_above:
                return "high"
            return "medium" if value > config.tier_medium_above else "low"

        def tier(p, t):
            return tier_of(basis(p, t))

        def tier_lapse(p, t):
            if config.tier_basis == "sessions_per_week":
                # The count drops by one at each session's 7-day mark; the tier changes at the
                # first drop that takes it across a threshold.
                now = tier(p, t)
                ends = sorted(s.end_ms + WEEK_MS for s in _this_week(p, t))
                for dropped, due in enumerate(ends, start=1):
                    if tier_of(len(ends) - dropped) != now:
                        return due
                return None
            return _earliest(
                x
                for x in (
                    decays_below_ms(p.engagement, p.decay_as_of_ms, config.engagement_half_life_ms, th, t)
                    for th in (config.tier_high_above, config.tier_medium_above)
                )
                if x is not None
            )

        def viewed_products(p, t):
            return {k: t - v for k, v in p.products_viewed.items() if any(h.covers(v, t) for h in config.horizons)}

        r["engagement_score"] = engagement
        r["engagement_tier"] = tier
        lapses["engagement_tier"] = tier_lapse
        r["category_affinity"] = affinity
        r["top_categories"] = top_categories
        r["ms_since_viewed_product"] = viewed_products

        def viewed_product_lapse(p, t):
            # A product is listed while some horizon covers its latest view.
            return _earliest(
                until for v in p.products_viewed.values() if (until := max(h.lapses_at(v) for h in config.horizons)) > t
            )

        lapses["ms_since_viewed_product"] = viewed_product_lapse

        def viewed_product(p, t, key):
            v = p.products_viewed.get(key)
            return None if v is None or not any(h.covers(v, t) for h in config.horizons) else t - v

        def viewed_product_key_lapse(p, t, key):
            v = p.products_viewed.get(key)
            until = None if v is None else max(h.lapses_at(v) for h in config.horizons)
            return until if until is not None and until > t else None

        self.key_readers["ms_since_viewed_product"] = viewed_product
        self.key_lapses["ms_since_viewed_product"] = viewed_product_key_lapse
        self.key_readers["category_affinity"] = lambda p, t, key: (
            decay(p.affinity[key], t - p.decay_as_of_ms, config.affinity_half_life_ms) if key in p.affinity else 0.0
        )
        spec = self.specs
        spec["engagement_score"] = FeatureSpec(NUMBER, DECAY, half_life_ms=config.engagement_half_life_ms)
        spec["engagement_tier"] = FeatureSpec(TEXT, choices=("high", "medium", "low"))
        spec["category_affinity"] = FeatureSpec(MAP, DECAY, half_life_ms=config.affinity_half_life_ms)
        spec["top_categories"] = FeatureSpec(TEXT_LIST)
        spec["ms_since_viewed_product"] = FeatureSpec(
            MAP, RECENCY, value_kind=DURATION, missing_key=None, changed_by=frozenset(("product_view",))
        )

    def _context(self) -> None:
        r, lapses, spec = self.readers, self.lapses, self.specs

        def latest(kind: str) -> Reader:
            def read(p: UserProfile, t: int) -> str | None:
                held = p.context.get(kind)
                return None if held is None else held[1]

            return read

        for kind in ("device", "country", "referrer"):
            r[kind] = latest(kind)
            spec[kind] = FeatureSpec(TEXT, nullable=True, choices=DEVICE_CLASSES if kind == "device" else ())

        # The latest touch's values; "" is a value that touch did not carry.
        r["utm_source"] = lambda p, t: None if p.touch is None else p.touch[1] or None
        r["utm_medium"] = lambda p, t: None if p.touch is None else p.touch[2] or None
        r["utm_campaign"] = lambda p, t: None if p.touch is None else p.touch[3] or None
        for name in ("utm_source", "utm_medium", "utm_campaign"):
            spec[name] = FeatureSpec(TEXT, nullable=True)
        r["first_touch_source"] = lambda p, t: None if p.first_seen is None else p.first_seen[1]
        spec["first_touch_source"] = FeatureSpec(TEXT, nullable=True)
        r["ms_since_first_seen"] = lambda p, t: None if p.first_seen is None else t - p.first_seen[0]
        spec["ms_since_first_seen"] = FeatureSpec(DURATION, RECENCY, nullable=True)

        def zone(p: UserProfile) -> str | None:
            held = p.context.get("timezone")
            return None if held is None else held[1]

        # Read at the evaluation instant in the latest timezone the user's events gave (UTC when
        # none); they step at local hour and day boundaries, which are their lapses.
        r["local_hour"] = lambda p, t: local_hour(t, zone(p))
        lapses["local_hour"] = lambda p, t: next_boundary_ms(t, zone(p), HOUR_S)
        spec["local_hour"] = FeatureSpec(NUMBER)
        r["local_weekday"] = lambda p, t: local_weekday(t, zone(p))
        lapses["local_weekday"] = lambda p, t: next_boundary_ms(t, zone(p), DAY_S)
        spec["local_weekday"] = FeatureSpec(TEXT, choices=WEEKDAYS)


def decays_below_ms(value: float, as_of_ms: int, half_life_ms: int, threshold: float, now_ms: int) -> int | None:
    """The first whole millisecond after `now_ms` at which a score decaying from `value` (at
    `as_of_ms`) is no longer above `threshold`, or None if it is not above it now."""
    if threshold <= 0:
        return None
    if decay(value, now_ms - as_of_ms, half_life_ms) <= threshold:
        return None
    due = as_of_ms + math.ceil(half_life_ms * math.log2(value / threshold))
    while decay(value, due - as_of_ms, half_life_ms) > threshold:  # float rounding at the edge
        due += 1
    return max(due, now_ms + 1)
