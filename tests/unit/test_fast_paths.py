"""Shortcuts the core takes for speed give exactly the answers of the long way round.

Each test runs the same traffic twice through an adapter-like driver (one timer per user, fired
as a watermark passes it, the state encoded after every call): once as the adapters run it, once
with the shortcut defeated, and compares every transition and every stored state byte for byte.
"""

from __future__ import annotations

import heapq
import random

import pytest

from jobs.settings import SHIPPED_DEFINITIONS
from tests.conftest import START_MS
from udfs.profile_config import HOUR_MS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.state import ProfileStateCodec
from udfs.transitions import DUPLICATE

WATERMARK_LAG_MS = 5_000


def drive(engine, events, state_codec, shortcuts: bool):
    """Events in the given order through the per-user step, with a timer service that fires
    registered (instant, user) timers once the watermark (max event time - lag) passes them, as
    the Flink job and the reference loop do. Without shortcuts, the engine's next-change memo is
    dropped before every step and a timer is registered at every next change (the long way
    round); with them, only the timers the step asks for. Returns the transitions and every
    user's state once time has passed the last timer, without the pending timer's instant (the
    two ways leave different timers pending, and so have stepped at different instants)."""
    profiles, timers, registered, out = {}, [], set(), []
    watermark = -(2**63)
    max_seen = None

    def commit(user_id, profile, step):
        out.extend(step.transitions)
        due = step.register_timer_ms if shortcuts else engine.next_change_ms(profile)
        if due is not None and (due, user_id) not in registered:
            registered.add((due, user_id))
            heapq.heappush(timers, (due, user_id))
        if shortcuts:  # the next change has a timer pending at or before it, so it is never missed
            memo = profile.next_change_memo  # asked the long way, without touching what the engine kept
            next_change = engine.next_change_ms(profile)
            profile.next_change_memo = memo
            assert next_change is None or any(t <= next_change for t, u in registered if u == user_id)
            assert memo is None or memo[2] == next_change  # what a timer step kept is the true answer

    def step(user_id, call, *args):
        profile = profiles[user_id]
        if not shortcuts:
            profile.next_change_memo = None
        result = call(user_id, profile, *args)
        if result.outcome != DUPLICATE:
            commit(user_id, profile, result)

    for event in events:
        profiles.setdefault(event.user_id, state_codec.decode(None))
        step(event.user_id, engine.step_event, event)
        max_seen = event.timestamp if max_seen is None else max(max_seen, event.timestamp)
        watermark = max(watermark, max_seen - WATERMARK_LAG_MS)
        while timers and timers[0][0] <= watermark:
            due, user_id = heapq.heappop(timers)
            registered.discard((due, user_id))
            step(user_id, engine.step_timer, due)
    end = max(due for due, _ in timers) if timers else watermark
    stored = {}
    for user_id, profile in sorted(profiles.items()):
        profile.pruned_at_ms = -(2**62)  # prune at the end in both ways, whenever they last did
        out.extend(engine.step_timer(user_id, profile, max(end, watermark)).transitions)
        profile.timer_ms = None
        stored[user_id] = state_codec.encode(profile)
    return out, stored


@pytest.fixture(scope="module")
def shop(catalog):
    """The shipped definitions and models, as the job loads them."""
    return Segmentation.load(SHIPPED_DEFINITIONS), catalog


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_step_shortcuts_change_nothing(shop, seed):
    segmentation, catalog = shop
    events = list(generate_events(40, seed, START_MS, 3 * 24 * HOUR_MS))
    # Out of order within the lag, and a few resent: the memo must hold across both.
    rng = random.Random(seed)
    for i in range(0, len(events) - 1, 7):
        if events[i + 1].timestamp - events[i].timestamp < WATERMARK_LAG_MS:
            events[i], events[i + 1] = events[i + 1], events[i]
    events += [events[rng.randrange(len(events))] for _ in range(20)]
    events.sort(key=lambda e: e.timestamp + (rng.random() < 0.05) * 1_000)
    state_codec = ProfileStateCodec(catalog.codec("UserProfileState"))
    fast = drive(segmentation.engine(), events, state_codec, shortcuts=True)
    slow = drive(segmentation.engine(), events, state_codec, shortcuts=False)
    assert len(fast[0]) > 100  # the traffic exercises the definitions
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]
