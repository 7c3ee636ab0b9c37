"""A brute-force oracle for the per-user profile features (see the "Profile features" spec).

Deliberately naive: it keeps the whole arrival-ordered log of accepted events of the current
lifetime and recomputes every feature from it by direct application of the spec's definitions.
No buckets as state, no incremental updates, no caps (the property tests use configs whose caps
are never reached, so the spec's exactness claim applies). Nothing here calls production feature
code; only the data types and the config are imported.

Readings taken where the spec is not explicit (also listed in the test module's docstring):
  * Dedup looks only within a lifetime (docs/features.md, issue 16): an event with time >= last_event +
    retention drops the old lifetime and starts a new one whatever its id; any other event is a
    duplicate when an accepted event of the current lifetime has its id within the dedup window.
  * After any step, if the clock >= last_event + retention the lifetime is dropped. The clock is
    never reset (it never goes back).
  * product_view events without product_id / category do not count in distinct_* /
    category_views / ms_since_viewed_product; events without category contribute to no affinity.
  * checkout_pending compares event times strictly: a checkout_start at the same ms as the latest
    purchase is not "later".
  * sessions_per_week / in_session / current session use T - last < bound (strict), as written.
  * Derived (session_id-less) runs are cut where consecutive times differ by strictly more than
    session_gap; a gap of exactly session_gap stays in one session.
  * Events with the same session_id are one session, unless that session had been forgotten
    when the event arrived (spec: no horizon covers its last event, which is at least 7 days and
    at least session_gap before the clock): then the event starts a new session with that id.
  * lifetime_spend / spend_<h> are 0.0 with no purchases; aov None.
  * Context: a value (device class, country, timezone, referrer) is the one of the latest event
    carrying it, the greater value on a time tie; the campaign values come together from the
    latest event with any of them (the greatest (source, medium, campaign) on a tie, "" for one
    it lacks); first_touch_source is the source (utm_source, else referrer, else "direct") of the
    earliest event, the least on a tie. Local time is read with the standard library's datetime
    in the latest timezone, UTC without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from udfs.events import EVENT_TYPES, UserEvent
from udfs.profile import WEEK_MS
from udfs.profile_config import ProfileConfig

CART_ACTIVITY = ("add_to_cart", "remove_from_cart", "checkout_start", "purchase")
CART_CHANGE = ("add_to_cart", "remove_from_cart")


@dataclass(frozen=True)
class Advance:
    """A timer firing: the clock moves to max(clock, time_ms)."""

    time_ms: int


Step = UserEvent | Advance


@dataclass(frozen=True)
class Accepted:
    arrival: int  # index of the step in the arrival order
    event: UserEvent
    clock_ms: int  # the user's clock once this event arrived: max(clock before, event time)

    @property
    def t(self) -> int:
        return self.event.timestamp


@dataclass
class Replay:
    clock_ms: int | None
    accepted: list[Accepted]  # current lifetime only, arrival order
    duplicates: int = 0
    resets: int = 0


def replay(steps: list[Step], config: ProfileConfig) -> Replay:
    """Dedup, clock and retention over the arrival-ordered steps."""
    clock: int | None = None
    life: list[Accepted] = []
    duplicates = resets = 0

    def last_event() -> int:
        return max(a.t for a in life)

    def expire_if_due() -> None:
        nonlocal life, resets
        if life and clock is not None and clock >= last_event() + config.retention_ms:
            life = []
            resets += 1

    for i, step in enumerate(steps):
        if isinstance(step, Advance):
            clock = step.time_ms if clock is None else max(clock, step.time_ms)
            expire_if_due()
            continue
        e = step
        if (
            life
            and e.timestamp < last_event() + config.retention_ms
            and any(a.event.event_id == e.event_id and a.t > last_event() - config.dedup_window_ms for a in life)
        ):
            duplicates += 1
            continue  # changes nothing, not even the clock
        new_clock = e.timestamp if clock is None else max(clock, e.timestamp)
        # The reset happens before the event is applied when its time reaches last + retention.
        if life and new_clock >= last_event() + config.retention_ms:
            life = []
            resets += 1
        life.append(Accepted(i, e, new_clock))
        clock = new_clock
        expire_if_due()  # only possible for a very late event into a fresh lifetime
    return Replay(clock, life, duplicates, resets)


def bucket(x: int, w: int) -> int:
    return x - x % w


def covered(t: int, now: int, length_ms: int, bucket_ms: int) -> bool:
    return bucket(t, bucket_ms) > bucket(now, bucket_ms) - length_ms


@dataclass(frozen=True)
class OSession:
    first: int
    last: int
    events: int
    session_id: str | None


def forgotten(last: int, clock: int, config: ProfileConfig) -> bool:
    """A session no feature can see any more at `clock`: the spec's rule, written out."""
    return (
        clock - last >= config.session_gap_ms
        and last <= clock - WEEK_MS
        and not any(covered(last, clock, h.length_ms, h.bucket_ms) for h in config.horizons)
    )


def sessions_of(accepted: list[Accepted], config: ProfileConfig) -> list[OSession]:
    gap_ms = config.session_gap_ms
    out: list[OSession] = []
    incarnations: dict[str, list[list[int]]] = {}  # session id -> times of each incarnation
    loose: list[int] = []
    for a in accepted:  # arrival order: whether a session was forgotten depends on when
        e = a.event
        if e.session_id is not None:
            runs = incarnations.setdefault(e.session_id, [])
            if not runs or forgotten(max(runs[-1]), a.clock_ms, config):
                runs.append([])
            runs[-1].append(e.timestamp)
        else:
            loose.append(e.timestamp)
    for sid, runs in incarnations.items():
        for times in runs:
            out.append(OSession(min(times), max(times), len(times), sid))
    loose.sort()
    run: list[int] = []
    for t in loose:
        if run and t - run[-1] > gap_ms:
            out.append(OSession(run[0], run[-1], len(run), None))
            run = []
        run.append(t)
    if run:
        out.append(OSession(run[0], run[-1], len(run), None))
    return out


def fold_cart(cart_events: list[Accepted]) -> dict[str, tuple[int, float]]:
    cart: dict[str, list] = {}
    for a in sorted(cart_events, key=lambda a: (a.t, a.arrival)):
        e = a.event
        if e.event_type == "purchase":
            cart = {}
        elif e.event_type == "add_to_cart":
            line = cart.setdefault(e.product_id, [0, 0.0])
            line[0] += 1 if e.quantity is None else e.quantity
            if e.price is not None:
                line[1] = float(e.price)
        elif e.event_type == "remove_from_cart":
            if e.product_id in cart:
                if e.quantity is None:
                    del cart[e.product_id]
                else:
                    cart[e.product_id][0] -= e.quantity
                    if cart[e.product_id][0] <= 0:
                        del cart[e.product_id]
    return {p: (q, price) for p, (q, price) in cart.items()}


def features_of(accepted: list[Accepted], config: ProfileConfig, now_ms: int) -> dict:
    """Every feature of the spec table at T = now_ms, from the lifetime's accepted events."""
    T = now_ms
    acc = [a for a in accepted if a.t <= T]
    E = [a.event for a in acc]
    f: dict = {}

    def since(pred) -> int | None:
        times = [e.timestamp for e in E if pred(e)]
        return T - max(times) if times else None

    f["ms_since_last_event"] = since(lambda e: True)
    for ty in EVENT_TYPES:
        f[f"ms_since_last_{ty}"] = since(lambda e, ty=ty: e.event_type == ty)
    f["ms_since_cart_activity"] = since(lambda e: e.event_type in CART_ACTIVITY)
    f["ms_since_cart_change"] = since(lambda e: e.event_type in CART_CHANGE)

    sessions = sessions_of(acc, config)

    for h in config.horizons:

        def cov(t: int, h=h) -> bool:
            return covered(t, T, h.length_ms, h.bucket_ms)

        inside = [e for e in E if cov(e.timestamp)]
        f[f"events_{h.name}"] = len(inside)
        for ty in EVENT_TYPES:
            f[f"count_{ty}_{h.name}"] = sum(1 for e in inside if e.event_type == ty)
        f[f"sessions_{h.name}"] = sum(1 for s in sessions if cov(s.last))
        views = [e for e in inside if e.event_type == "product_view"]
        f[f"distinct_products_viewed_{h.name}"] = len({e.product_id for e in views if e.product_id is not None})
        f[f"distinct_categories_viewed_{h.name}"] = len({e.category for e in views if e.category is not None})
        cat_views: dict[str, int] = {}
        for e in views:
            if e.category is not None:
                cat_views[e.category] = cat_views.get(e.category, 0) + 1
        f[f"category_views_{h.name}"] = cat_views
        purchases = [e for e in inside if e.event_type == "purchase"]
        spend = sum(0.0 if e.price is None else float(e.price) for e in purchases)
        f[f"spend_{h.name}"] = spend
        f[f"orders_{h.name}"] = len(purchases)
        f[f"aov_{h.name}"] = spend / len(purchases) if purchases else None

    purchases = [e for e in E if e.event_type == "purchase"]
    f["lifetime_spend"] = sum(0.0 if e.price is None else float(e.price) for e in purchases)
    f["lifetime_orders"] = len(purchases)
    f["lifetime_aov"] = f["lifetime_spend"] / len(purchases) if purchases else None

    cart = fold_cart([a for a in acc if a.event.event_type in ("add_to_cart", "remove_from_cart", "purchase")])
    f["cart"] = cart
    f["cart_quantity"] = {product: quantity for product, (quantity, _) in cart.items()}
    f["cart_lines"] = len(cart)
    f["cart_items"] = sum(q for q, _ in cart.values())
    f["cart_value"] = sum(q * p for q, p in cart.values())

    checkouts = [e.timestamp for e in E if e.event_type == "checkout_start"]
    if not checkouts:
        f["checkout_pending"] = 0
    elif not purchases:
        f["checkout_pending"] = 1
    else:
        f["checkout_pending"] = int(max(checkouts) > max(e.timestamp for e in purchases))

    f["sessions_per_week"] = sum(1 for s in sessions if T - s.last < WEEK_MS)
    current = max(
        sessions,
        key=lambda s: (s.last, s.session_id is not None, s.session_id or ""),
        default=None,
    )
    in_session = current is not None and T - current.last < config.session_gap_ms
    f["in_session"] = int(in_session)
    f["current_session_start_ms"] = current.first if in_session else None
    f["current_session_events"] = current.events if in_session else None
    f["current_session_duration_ms"] = current.last - current.first if in_session else None

    f["engagement_score"] = sum(
        config.engagement_weights.get(e.event_type, 0.0) * 2.0 ** (-(T - e.timestamp) / config.engagement_half_life_ms)
        for e in E
    )
    basis = f["sessions_per_week"] if config.tier_basis == "sessions_per_week" else f["engagement_score"]
    if basis > config.tier_high_above:
        f["engagement_tier"] = "high"
    elif basis > config.tier_medium_above:
        f["engagement_tier"] = "medium"
    else:
        f["engagement_tier"] = "low"

    affinity: dict[str, float] = {}
    for e in E:
        w = config.affinity_weights.get(e.event_type, 0.0)
        if e.category is not None and w > 0:
            affinity[e.category] = affinity.get(e.category, 0.0) + w * 2.0 ** (
                -(T - e.timestamp) / config.affinity_half_life_ms
            )
    f["category_affinity"] = affinity
    f["top_categories"] = [c for c, _ in sorted(affinity.items(), key=lambda kv: (-kv[1], kv[0]))][
        : config.affinity_top_k
    ]

    latest_view: dict[str, int] = {}
    for e in E:
        if e.event_type == "product_view" and e.product_id is not None:
            latest_view[e.product_id] = max(latest_view.get(e.product_id, e.timestamp), e.timestamp)
    f["ms_since_viewed_product"] = {
        p: T - t
        for p, t in latest_view.items()
        if any(covered(t, T, h.length_ms, h.bucket_ms) for h in config.horizons)
    }
    f.update(context_features(E, T))
    return f


def device_class_of(device: str) -> str | None:
    """docs/features.md: desktop, mobile and tablet in any case, other for anything else, none when blank."""
    cleaned = device.strip().lower()
    if not cleaned:
        return None
    return cleaned if cleaned in ("desktop", "mobile", "tablet") else "other"


def context_features(E: list[UserEvent], T: int) -> dict:
    """The context features at T from the events of the lifetime up to T."""
    f: dict = {}

    def latest(values: list[tuple[int, str]]) -> str | None:
        return max(values)[1] if values else None

    devices = [(e.timestamp, c) for e in E if e.device is not None and (c := device_class_of(e.device)) is not None]
    f["device"] = latest(devices)
    f["country"] = latest([(e.timestamp, e.country) for e in E if e.country is not None])
    f["referrer"] = latest([(e.timestamp, e.referrer) for e in E if e.referrer is not None])
    zone = latest([(e.timestamp, e.timezone) for e in E if e.timezone is not None])
    touches = [
        (e.timestamp, e.utm_source or "", e.utm_medium or "", e.utm_campaign or "")
        for e in E
        if (e.utm_source, e.utm_medium, e.utm_campaign) != (None, None, None)
    ]
    touch = max(touches) if touches else None
    for i, name in enumerate(("utm_source", "utm_medium", "utm_campaign"), start=1):
        f[name] = touch[i] or None if touch else None
    firsts = [(e.timestamp, e.utm_source or e.referrer or "direct") for e in E]
    f["first_touch_source"] = min(firsts)[1] if firsts else None
    f["ms_since_first_seen"] = T - min(firsts)[0] if firsts else None
    local = datetime.fromtimestamp(T // 1000, UTC if zone is None else ZoneInfo(zone))
    f["local_hour"] = local.hour
    f["local_weekday"] = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")[local.weekday()]
    return f


def oracle_features(steps: list[Step], config: ProfileConfig, now_ms: int | None = None) -> dict:
    """Replays the steps and returns the features at now_ms (default: the resulting clock)."""
    r = replay(steps, config)
    T = r.clock_ms if now_ms is None else now_ms
    if T is None:
        T = 0
    return features_of(r.accepted, config, T)


# Which keys hold floats (compared approximately); everything else is compared exactly.
def float_keys(config: ProfileConfig) -> set[str]:
    keys = {"lifetime_spend", "lifetime_aov", "cart_value", "engagement_score"}
    for h in config.horizons:
        keys |= {f"spend_{h.name}", f"aov_{h.name}"}
    return keys
