"""Seeded shopper simulation: personas, sessions and funnels, as a time-ordered event stream.

Pure Python and reproducible: the same seed and arguments give the same events, byte for byte,
which the tests, the backtest, model training and the benchmark all rely on.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass

from udfs.events import UserEvent
from udfs.profile_config import MINUTE_MS

CATEGORIES = ("shoes", "outerwear", "electronics", "books", "kitchen", "toys", "beauty", "sports")
DEVICES = ("mobile", "desktop", "tablet")
# (country, timezone, weight) of the generated shoppers.
PLACES = (
    ("DE", "Europe/Berlin", 0.3),
    ("FR", "Europe/Paris", 0.2),
    ("GB", "Europe/London", 0.2),
    ("US", "America/New_York", 0.15),
    ("US", "America/Los_Angeles", 0.1),
    ("IN", "Asia/Kolkata", 0.05),
)
# How a session starts: (utm_source, utm_medium, utm_campaign, referrer, weight); direct visits
# carry none. A user's first session is drawn from all of them, later ones mostly direct.
LANDINGS = (
    (None, None, None, None, 0.35),
    (None, None, None, "www.google.com", 0.2),
    ("google", "cpc", "spring_sale", "www.google.com", 0.15),
    ("facebook", "paid_social", "spring_sale", "m.facebook.com", 0.1),
    ("newsletter", "email", "weekly", None, 0.1),
    (None, None, None, "blog.example.org", 0.1),
)
RETURN_DIRECT = 0.6  # a later session is a direct visit this often


@dataclass(frozen=True)
class Persona:
    """A kind of shopper of the seeded traffic: how often and how they browse, cart and buy."""

    name: str
    weight: float
    sessions_per_day: float  # mean
    session_events: tuple[int, int]  # min, max browsing events per session
    cart_prob: float  # a session ends with items in the cart
    checkout_prob: float  # given a cart, the shopper starts checkout
    purchase_prob: float  # given a checkout, the shopper pays
    engage_prob: float  # a browsing step is a video / review instead of a view
    churn_after_days: float | None = None  # stops visiting after this many days


PERSONAS = (
    Persona("buyer", 0.25, 2.0, (3, 10), 0.6, 0.8, 0.85, 0.1),
    Persona("cart_abandoner", 0.2, 1.5, (3, 8), 0.8, 0.3, 0.2, 0.05),
    Persona("window_shopper", 0.3, 2.5, (4, 15), 0.05, 0.1, 0.1, 0.25),
    Persona("researcher", 0.1, 1.0, (5, 20), 0.2, 0.5, 0.6, 0.5),
    Persona("churner", 0.15, 2.0, (2, 8), 0.3, 0.5, 0.5, 0.1, churn_after_days=0.25),
)


def persona_of(user_index: int, seed: int) -> Persona:
    """The persona of a user, drawn from the seed alone so that every run gives the same."""
    rng = random.Random(f"{seed}/persona/{user_index}")
    return rng.choices(PERSONAS, weights=[p.weight for p in PERSONAS])[0]


def user_id_of(user_index: int) -> str:
    """The user id of the generated user of this index."""
    return f"u{user_index:07d}"


def _user_events(user_index: int, seed: int, start_ms: int, end_ms: int) -> Iterator[UserEvent]:
    rng = random.Random(f"{seed}/user/{user_index}")
    persona = persona_of(user_index, seed)
    user_id = user_id_of(user_index)
    device = rng.choice(DEVICES)
    # Context from a stream of its own, so the events' other fields are what they were before it.
    context_rng = random.Random(f"{seed}/context/{user_index}")
    country, timezone, _ = context_rng.choices(PLACES, weights=[p[2] for p in PLACES])[0]
    landing_weights = [landing[4] for landing in LANDINGS]
    landing: tuple = LANDINGS[0]
    favourite = rng.sample(CATEGORIES, 2)
    horizon = end_ms
    if persona.churn_after_days is not None:
        horizon = min(end_ms, start_ms + int(persona.churn_after_days * 24 * 60 * MINUTE_MS))
    mean_gap = 24 * 60 * MINUTE_MS / persona.sessions_per_day
    t = start_ms + int(rng.random() * mean_gap)
    seq = 0
    session_no = 0

    def event(kind: str, ts: int, **fields) -> UserEvent:
        nonlocal seq, landing
        seq += 1
        source, medium, campaign, referrer, _ = landing
        landing = LANDINGS[0]  # the landing's values go with the session's first event only
        return UserEvent(
            event_id=f"{user_id}-{seq:07d}",
            user_id=user_id,
            event_type=kind,
            timestamp=ts,
            session_id=f"{user_id}-s{session_no}",
            device=device,
            **fields,
            referrer=referrer,
            utm_source=source,
            utm_medium=medium,
            utm_campaign=campaign,
            country=country,
            timezone=timezone,
        )

    while t < horizon:
        session_no += 1
        if session_no == 1 or context_rng.random() >= RETURN_DIRECT:
            landing = context_rng.choices(LANDINGS, weights=landing_weights)[0]
        cart: dict[str, float] = {}
        steps = rng.randint(*persona.session_events)
        for _ in range(steps):
            category = rng.choice(favourite) if rng.random() < 0.7 else rng.choice(CATEGORIES)
            product = f"p-{category}-{rng.randint(1, 40):03d}"
            price = round(rng.uniform(5, 250), 2)
            r = rng.random()
            if r < 0.15:
                yield event("search", t, category=category, properties={"query": category})
            elif r < 0.15 + persona.engage_prob:
                yield event(rng.choice(("video_play", "review_read")), t, product_id=product, category=category)
            elif r < 0.2 + persona.engage_prob:
                yield event("page_view", t, category=category)
            else:
                yield event("product_view", t, product_id=product, category=category, price=price)
                if rng.random() < persona.cart_prob / 2:
                    t += rng.randint(5_000, 60_000)
                    yield event("add_to_cart", t, product_id=product, category=category, price=price, quantity=1)
                    cart[product] = price
                elif rng.random() < 0.03:
                    yield event("wishlist_add", t, product_id=product, category=category, price=price)
            if cart and rng.random() < 0.05:
                removed = rng.choice(sorted(cart))
                t += rng.randint(5_000, 30_000)
                yield event("remove_from_cart", t, product_id=removed, price=cart.pop(removed), quantity=1)
            t += rng.randint(10_000, 3 * MINUTE_MS)
        if cart and rng.random() < persona.checkout_prob:
            yield event("checkout_start", t, price=round(sum(cart.values()), 2))
            t += rng.randint(30_000, 4 * MINUTE_MS)
            if rng.random() < persona.purchase_prob:
                yield event("purchase", t, price=round(sum(cart.values()), 2), quantity=len(cart))
        t += int(rng.expovariate(1 / mean_gap)) + 15 * MINUTE_MS


def generate_events(users: int, seed: int, start_ms: int, duration_ms: int) -> Iterator[UserEvent]:
    """All users' events over [start_ms, start_ms + duration_ms), merged in event-time order."""
    end_ms = start_ms + duration_ms
    streams = [_user_events(i, seed, start_ms, end_ms) for i in range(users)]
    for ev in heapq.merge(*streams, key=lambda e: (e.timestamp, e.user_id)):
        if ev.timestamp < end_ms:
            yield ev
