"""Shortcuts the core takes for speed give exactly the answers of the long way round.

Each test runs the same traffic twice through an adapter-like driver (one timer per user, fired
as a watermark passes it, the state encoded after every call): once as the adapters run it, once
with the shortcut defeated, and compares every transition and every stored state byte for byte.
"""

from __future__ import annotations

import heapq
import random

import pytest

from tests.conftest import START_MS
from udfs.definitions import DEFAULT_DEFINITIONS
from udfs.segmentation import Segmentation
from udfs.shoppers import generate_events
from udfs.state import ProfileStateCodec

HOUR = 3_600_000
WATERMARK_LAG_MS = 5_000


def drive(engine, events, state_codec, forget_memo: bool):
    """Events in the given order; a per-user timer at next_change_ms, fired once the watermark
    (max event time - lag) passes it, as the Flink job and the reference loop do."""
    profiles, timers, out, stored = {}, [], [], []
    watermark = -(2**63)
    max_seen = None

    def commit(user_id, profile, transitions):
        out.extend(transitions)
        due = engine.next_change_ms(profile)
        if forget_memo:
            profile.next_change_memo = None
        if due != profile.timer_ms:
            profile.timer_ms = due
            if due is not None:
                heapq.heappush(timers, (due, user_id))
        stored.append(state_codec.encode(profile))

    for event in events:
        profile = profiles.setdefault(event.user_id, state_codec.decode(None))
        if not engine.is_duplicate(profile, event):
            commit(event.user_id, profile, engine.on_accepted_event(event.user_id, profile, event))
        max_seen = event.timestamp if max_seen is None else max(max_seen, event.timestamp)
        watermark = max(watermark, max_seen - WATERMARK_LAG_MS)
        while timers and timers[0][0] <= watermark:
            due, user_id = heapq.heappop(timers)
            profile = profiles[user_id]
            if profile.timer_ms == due:
                profile.timer_ms = None
                commit(user_id, profile, engine.advance_to(user_id, profile, due))
    return out, stored


@pytest.fixture(scope="module")
def shop(catalog):
    """The shipped definitions and models, as the job loads them."""
    return Segmentation.load(DEFAULT_DEFINITIONS), catalog


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_next_change_memo_changes_nothing(shop, seed):
    segmentation, catalog = shop
    events = list(generate_events(40, seed, START_MS, 3 * 24 * HOUR))
    # Out of order within the lag, and a few resent: the memo must hold across both.
    rng = random.Random(seed)
    for i in range(0, len(events) - 1, 7):
        if events[i + 1].timestamp - events[i].timestamp < WATERMARK_LAG_MS:
            events[i], events[i + 1] = events[i + 1], events[i]
    events += [events[rng.randrange(len(events))] for _ in range(20)]
    events.sort(key=lambda e: e.timestamp + (rng.random() < 0.05) * 1_000)
    state_codec = ProfileStateCodec(catalog.codec("UserProfileState"))
    fast = drive(segmentation.engine(), events, state_codec, forget_memo=False)
    slow = drive(segmentation.engine(), events, state_codec, forget_memo=True)
    assert len(fast[0]) > 100  # the traffic exercises the definitions
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]
