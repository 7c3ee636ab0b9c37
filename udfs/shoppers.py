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
    favourite = rng.sample(CATEGORIES, 2)
    horizon = end_ms
    if persona.churn_after_days is not None:
        horizon = min(end_ms, start_ms + int(persona.churn_after_days * 24 * 60 * MINUTE_MS))
    mean_gap = 24 * 60 * MINUTE_MS / persona.sessions_per_day
    t = start_ms + int(rng.random() * mean_gap)
    seq = 0
    session_no = 0

    def event(kind: str, ts: int, **fields) -> UserEvent:
        nonlocal seq
        seq += 1
        return UserEvent(
            event_id=f"{user_id}-{seq:07d}",
            user_id=user_id,
            event_type=kind,
            timestamp=ts,
            session_id=f"{user_id}-s{session_no}",
            device=device,
            **fields,
        )

    while t < horizon:
        session_no += 1
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
