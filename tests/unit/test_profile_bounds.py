"""Bounded state: what one user holds is capped by the configuration, whatever they send, and the
caps forget the oldest (or weakest) entries first; retention drops the profile."""

from __future__ import annotations

import random

import pytest

from tests.conftest import START_MS
from tests.unit.basic_definitions import basic_definitions
from udfs.codec import SchemaCatalog
from udfs.events import UserEvent
from udfs.profile import PRUNE_EVERY_MS, UserProfile
from udfs.profile_config import DAY_MS, HOUR_MS, MINUTE_MS, ProfileConfig
from udfs.state import ProfileStateCodec
from udfs.transitions import RETENTION_RULE, SegmentEngine

T0 = START_MS


def engine(**config) -> SegmentEngine:
    return SegmentEngine(basic_definitions(profile_config=ProfileConfig(**config)))


def flood(n: int, seed: int = 7):
    """A bot: an event every 5 minutes with fresh products, categories and session ids."""
    rng = random.Random(seed)
    kinds = ["page_view", "product_view", "add_to_cart", "remove_from_cart", "search", "purchase"]
    for i in range(n):
        kind = rng.choice(kinds)
        yield UserEvent(
            f"e{i}",
            "bot",
            kind,
            T0 + i * 5 * MINUTE_MS,
            session_id=f"s{i // 7}",
            product_id=f"p{rng.randrange(10_000)}",
            category=f"c{rng.randrange(500)}",
            price=round(rng.uniform(1, 99), 2),
            quantity=rng.choice([None, 1, 2]),
        )


def test_state_stops_growing_under_a_flood_of_new_products_categories_and_sessions():
    e, p = engine(), UserProfile()
    codec = ProfileStateCodec(SchemaCatalog().codec("UserProfileState"))
    sizes = {}
    for i, event in enumerate(flood(20_000), start=1):  # 69 days
        e.on_event("bot", p, event)
        if i in (10_000, 20_000):
            sizes[i] = len(codec.encode(p))
    config = e.config
    assert len(p.products_viewed) == len(p.categories_viewed) == config.max_tracked_items
    assert len(p.named_sessions) <= config.max_tracked_items
    assert len(p.affinity) <= config.max_tracked_items
    assert len(p.cart_ops) <= config.max_cart_lines
    assert all(len(ops) <= config.max_cart_ops_per_line for ops in p.cart_ops.values())
    # What no feature sees any more lingers until the next pruning, at most PRUNE_EVERY_MS later.
    assert len(p.seen_event_ids) <= (config.dedup_window_ms + PRUNE_EVERY_MS) // (5 * MINUTE_MS) + 1
    widths = {h.bucket_ms: h.length_ms // h.bucket_ms for h in config.horizons}
    assert all(len(p.buckets[w]) <= n + -(-PRUNE_EVERY_MS // w) for w, n in widths.items())
    assert sizes[20_000] <= sizes[10_000] * 1.05  # bounded: twice the events, the same size


def test_a_bucket_counts_at_most_max_bucket_categories_keeping_the_most_viewed():
    """Issue 19: 4,000 categories in an hour made every read of category_views_<h> merge
    thousands of entries. Per bucket, beyond the cap the least viewed (then the first by name)
    is forgotten: the categories viewed most stay exact."""
    e, p = engine(max_bucket_categories=4), UserProfile()
    views = [("shoes", 3), ("hats", 2), ("socks", 2)] + [(f"c{i:03d}", 1) for i in range(40)]
    events = [
        UserEvent(f"e{n}", "bot", "product_view", T0 + n * 1000, product_id="p", category=category)
        for n, category in enumerate(c for c, times in views for _ in range(times))
    ]
    for event in events:
        e.on_event("bot", p, event)
    assert all(len(b.category_views) <= 4 for ring in p.buckets.values() for b in ring.values())
    features = e.features(p, p.clock_ms)
    # The last single view (c039) replaced the one before it each time: 4 kept, the rest gone.
    assert features["category_views_1h"] == {"shoes": 3, "hats": 2, "socks": 2, "c039": 1}
    with pytest.raises(Exception, match="max_bucket_categories must be at least 1"):
        ProfileConfig(max_bucket_categories=0)


def test_a_long_cart_line_is_folded_and_still_exact_for_in_order_operations():
    e, p = engine(max_cart_ops_per_line=4), UserProfile()
    quantity = 0
    for i in range(40):
        if i % 3 == 2:
            e.on_event(
                "u", p, UserEvent(f"r{i}", "u", "remove_from_cart", T0 + i * MINUTE_MS, product_id="p", quantity=1)
            )
            quantity = max(quantity - 1, 0)
        else:
            e.on_event(
                "u",
                p,
                UserEvent(f"a{i}", "u", "add_to_cart", T0 + i * MINUTE_MS, product_id="p", quantity=2, price=float(i)),
            )
            quantity += 2
            price = float(i)
    assert len(p.cart_ops["p"]) <= 4
    assert e.features(p, p.clock_ms)["cart"] == {"p": (quantity, price)}


def test_the_oldest_viewed_products_are_forgotten_beyond_the_cap():
    e, p = engine(max_tracked_items=5), UserProfile()
    for i in range(8):
        e.on_event("u", p, UserEvent(f"v{i}", "u", "product_view", T0 + i * MINUTE_MS, product_id=f"p{i}"))
    features = e.features(p, p.clock_ms)
    assert features["distinct_products_viewed_30d"] == 5
    assert set(features["ms_since_viewed_product"]) == {"p3", "p4", "p5", "p6", "p7"}


def test_an_event_id_forgotten_beyond_the_cap_counts_again():
    e, p = engine(max_seen_event_ids=3), UserProfile()
    for i in range(4):
        e.on_event("u", p, UserEvent(f"v{i}", "u", "page_view", T0 + i))
    e.on_event("u", p, UserEvent("v0", "u", "page_view", T0 + 10))  # forgotten: counted
    e.on_event("u", p, UserEvent("v3", "u", "page_view", T0 + 11))  # remembered: not counted
    assert e.features(p, p.clock_ms)["count_page_view_10m"] == 5


def test_retention_exits_every_segment_drops_the_profile_and_a_return_continues_the_sequences():
    e, p = engine(retention_ms=30 * DAY_MS), UserProfile()
    e.on_event("u", p, UserEvent("a", "u", "add_to_cart", T0, product_id="p", price=5.0))
    first_enter = p.memberships["cart_holder"].sequence
    expiry = T0 + 30 * DAY_MS
    early = e.advance_to("u", p, expiry - 1)
    assert {(t.segment, t.kind) for t in early} == {("active_browser", "EXIT"), ("cart_abandoner", "ENTER")}
    out = e.advance_to("u", p, expiry)
    assert {(t.segment, t.kind, t.rule, t.event_time) for t in out} == {
        ("cart_holder", "EXIT", RETENTION_RULE, expiry),
        ("cart_abandoner", "EXIT", RETENTION_RULE, expiry),
    }
    assert p.is_empty and p.cart() == {} and e.next_change_ms(p) is None
    features = e.features(p, p.clock_ms)
    assert features["ms_since_last_event"] is None and features["events_30d"] == 0

    back = expiry + HOUR_MS
    [again] = [
        t
        for t in e.on_event("u", p, UserEvent("b", "u", "add_to_cart", back, product_id="p"))
        if t.segment == "cart_holder"
    ]
    assert again.kind == "ENTER"
    assert again.sequence > first_enter + 1  # above the EXIT the retention emitted: ids never repeat
    assert again.sequence == back * 1000 + 1


def test_a_duplicate_changes_nothing_not_even_the_clock():
    e, p = engine(), UserProfile()
    e.on_event("u", p, UserEvent("a", "u", "purchase", T0, price=10.0))
    before = e.features(p, p.clock_ms)
    assert e.is_duplicate(p, UserEvent("a", "u", "purchase", T0 + MINUTE_MS, price=10.0))
    assert e.on_event("u", p, UserEvent("a", "u", "purchase", T0 + MINUTE_MS, price=10.0)) == []
    assert p.clock_ms == T0
    assert e.features(p, p.clock_ms) == before


@pytest.mark.parametrize("days_later", [90, 91])
def test_an_event_id_of_an_expired_lifetime_starts_a_new_lifetime_not_a_duplicate(days_later):
    """Issue 16: `when: ms_since_last_event < 10m`, id `a` at T0 and `a` again 90 or 91 days
    later (the default retention is 90 days), whether or not the retention timer fired between."""
    from udfs.definitions import parse_definitions

    definitions = parse_definitions("version: v\nsegments:\n  - name: active\n    when: ms_since_last_event < 10m\n")
    again = T0 + days_later * DAY_MS
    for timer_fired_first in (False, True):
        e, p = SegmentEngine(definitions), UserProfile()
        out = e.step_event("u", p, UserEvent("a", "u", "page_view", T0)).transitions
        if timer_fired_first:
            while p.timer_ms is not None and p.timer_ms <= again - 1:
                out += e.step_timer("u", p, p.timer_ms).transitions
        step = e.step_event("u", p, UserEvent("a", "u", "page_view", again))
        out += step.transitions
        assert step.outcome == "applied"
        assert [(t.kind, t.event_time, t.cause) for t in out] == [
            ("ENTER", T0, "EVENT"),
            ("EXIT", T0 + 10 * MINUTE_MS, "TIMER"),
            ("ENTER", again, "EVENT"),
        ]
        assert out[2].sequence == again * 1000 + 1  # the new lifetime's sequences
