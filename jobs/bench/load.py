"""The load: generated shoppers' events preloaded into the events topics between the markers, and
the one event per user of the checkpoint run."""

from __future__ import annotations

from jobs.bench import log, now_ms
from jobs.bench.markers import (
    END_MARKER_AGE_MS,
    PROGRESS_EVERY,
    PROGRESS_MARKER_PREFIX,
    START_MARKER,
    end_marker_events,
)
from jobs.bench.producing import flush, make_producer, produce
from udfs.profile_config import DAY_MS, HOUR_MS

# Generated shoppers produce about 19 events per user and day (profile-stats: 38,786 events for
# 2,000 users in a day); used only to pick how many days of traffic hold the requested events.
EVENTS_PER_USER_DAY = 19.0


def generated_events(count: int, users: int, seed: int, end_ms: int):
    """The first `count` events of generated shopper traffic for `users` users, ending by end_ms."""
    from udfs.shoppers import generate_events

    days = max(count / (users * EVENTS_PER_USER_DAY), 1 / 24) * 1.3
    while True:
        duration = int(days * DAY_MS)
        start = end_ms - duration
        taken = 0
        for event in generate_events(users, seed, start, duration):
            yield event
            taken += 1
            if taken == count:
                return
        if taken:  # not enough traffic in the span: the caller got fewer events; say so
            log(f"generated only {taken} of {count} events for {users} users over {days:.2f} days")
            return
        days *= 2


def checkpoint_events(users: int, end_ms: int):
    """One event for each of `users` users (a product view), in time order over the last hour:
    what a checkpoint of many users' state needs, without generating their histories."""
    from udfs.events import UserEvent
    from udfs.shoppers import CATEGORIES, user_id_of

    span = HOUR_MS
    start = end_ms - span
    for i in range(users):
        user = user_id_of(i)
        category = CATEGORIES[i % len(CATEGORIES)]
        yield UserEvent(
            f"{user}-0000001",
            user,
            "product_view",
            start + i * span // max(users, 1),
            session_id=f"{user}-s1",
            product_id=f"p-{category}-{i % 40 + 1:03d}",
            category=category,
            price=float(5 + i % 200),
            device="mobile",
        )


def preload(bootstrap: str, topics: dict[str, int], events) -> tuple[int, int, int]:
    """Writes to each topic (name: partitions): a start marker at the head of every partition,
    the events keyed by user, then the end markers. Returns (events, first time, last time)."""
    from udfs.codec import SchemaCatalog

    codec = SchemaCatalog().codec("UserEvent")
    producer = make_producer(bootstrap, **{"linger.ms": 20, "batch.size": 1_000_000})
    for topic, partitions in topics.items():
        for p in range(partitions):
            produce(producer, topic, START_MARKER, None, p)
    flush(producer, "start markers")
    count, first, last = 0, None, None
    for event in events:
        value, key = codec.encode(event.to_record()), event.user_id.encode()
        for topic in topics:
            produce(producer, topic, value, key)
        producer.poll(0)
        count += 1
        first = event.timestamp if first is None else first
        last = event.timestamp
        if count % PROGRESS_EVERY == 0:
            step = f"{PROGRESS_MARKER_PREFIX}{count // PROGRESS_EVERY}-"
            for topic, partitions in topics.items():
                for p, marker in end_marker_events(partitions, first - END_MARKER_AGE_MS, step, 1):
                    produce(producer, topic, codec.encode(marker.to_record()), marker.user_id.encode(), p)
    flush(producer, "events")
    for topic, partitions in topics.items():
        for p, marker in end_marker_events(partitions, (first or now_ms()) - END_MARKER_AGE_MS):
            produce(producer, topic, codec.encode(marker.to_record()), marker.user_id.encode(), p)
    flush(producer, "end markers")
    return count, first or 0, last or 0
